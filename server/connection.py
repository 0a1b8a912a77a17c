"""One client connection: the hot path (read, verify, apply, reply) and the
careful close that follows a refused frame.

Timeouts are enforced from outside by ``server.timeouts.TimeoutReaper``; the
loop only keeps the counters it reads. Every ending other than the peer
closing at a frame boundary or shutdown is raised as a ``ConnectionEnded``
(a refused frame, the reaper's verdict, the store's failure).

**Replies computed away from their connection** (``Outbox``): a store whose
answers come from elsewhere (Redis: one round trip for many connections'
reads) takes a read with ``submit(increments, outbox)`` and later calls
``deliver`` or ``fail`` on the connection's ``Outbox`` from its own greenlet.
``deliver`` writes the replies straight to the socket when the socket takes
them at once (the usual case), so the connection's greenlet, already back in
its ``recv``, is not woken just to write them: in ping-pong that halves the
greenlet switches per request. A connection has at most one read in the
store at a time, so replies stay in request order.

What cannot be done on the spot is handed back: the rest of a write the
socket would not take is written by a greenlet of its own (watched like the
connection's writes, so the write timeout applies), and an ending (a refused
frame, the store unavailable) interrupts the connection's ``recv``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Sequence

import gevent
from gevent.hub import Waiter

from counter_server.common.sockets import Reader, reader
from counter_server.protocol import encode_replies, overflow
from counter_server.server.errors import ConnectionEnded, FrameRefused
from counter_server.server.limits import Bucket
from counter_server.server.stats import ServerStats
from counter_server.server.store import CounterStore, DeferringStore
from counter_server.server.timeouts import Watched

# Bytes read at once: up to 1024 frames. Bounds what one connection holds
# while its client does not read (at most one read's 8 KiB of replies), and
# is still far more than a pipelining client keeps in flight.
RECV_SIZE = 16 * 1024
# After refusing a frame, and at shutdown, we half-close and read what the
# client still sends for a little while, so that closing with unread input
# (which makes the kernel send RST) cannot destroy the replies we owed it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20


def serve(
    watched: Watched, store: CounterStore, stats: ServerStats, bucket: Bucket | None = None
) -> None:
    """Serve frames on ``watched.sock`` until the peer closes or shutdown
    stops the reading (``watched.stopped``); then return.

    Every complete valid frame of a read is applied in order and all their
    replies go out in one write; with a ``bucket``, each frame's rate token
    is taken before it is applied. Every other ending is raised as a
    ConnectionEnded: FrameRefused (checksum, overflow, or truncated if the
    peer closed mid-frame), the reaper's verdict, the store's failure.
    OSError from the socket (reset, broken pipe) propagates, except when
    shutdown cut the read side.
    """
    deferred = isinstance(store, DeferringStore) and Reader.supports(watched.sock)
    loop = _serve_deferred if deferred else _serve
    try:
        loop(watched, store, stats, bucket)
    except OSError:
        # The reaper or shutdown cut the socket under a blocked send.
        if watched.verdict is not None:
            raise watched.verdict from None
        if not watched.stopped:
            raise


def _read_side_ended(watched: Watched) -> None:
    """A read returned end of stream: the reaper's verdict if it cut the
    socket; nothing if shutdown did or the peer closed between frames; a
    partial frame left by the peer is refused (truncated)."""
    if watched.verdict is not None:
        raise watched.verdict
    if not watched.stopped:
        truncated = watched.decoder.close()
        if truncated is not None:
            raise FrameRefused(truncated)


def _serve(
    watched: Watched, store: CounterStore, stats: ServerStats, bucket: Bucket | None
) -> None:
    """The hot loop. Blocking steps: ``recv`` (the reaper watches bytes_in),
    ``watched.write`` and, over the rate, ``watched.paid`` and
    ``watched.read_size`` (which flag themselves)."""
    decoder = watched.decoder
    # Bound methods in locals: one attribute lookup per connection instead of
    # one per request.
    feed = decoder.feed
    apply = store.apply
    recv = reader(watched.sock)
    write = watched.write
    writes_by_size = stats.replies_per_write
    read_size = RECV_SIZE
    if bucket is not None:  # read no more frames than the client has tokens for
        tokens = bucket.take(0)[1]
        read_size, tokens = watched.read_size(bucket, tokens, RECV_SIZE)
    while not watched.stopped:
        chunk = recv(read_size)
        if not chunk:
            _read_side_ended(watched)
            return
        watched.bytes_in += len(chunk)
        increments = feed(chunk)
        while increments:
            later = None
            if bucket is not None:  # no frame is applied before its token is taken
                increments, later, tokens = watched.paid(bucket, increments)
            replies = apply(increments)
            applied = len(replies)
            refused = increments[applied] if applied < len(increments) else None
            if applied:
                out = encode_replies(replies)
                # Drop the lists before a write that a client not reading can
                # block for long: it then holds only its bytes.
                chunk = increments = replies = None
                write(out)
                writes_by_size[applied.bit_length()] += 1
            if refused is not None:
                raise FrameRefused(overflow(refused, store.value))
            increments = later
        if bucket is not None:  # out of tokens: stop reading until they refill
            read_size, tokens = watched.read_size(bucket, tokens, RECV_SIZE)
        if decoder.error is not None:
            raise FrameRefused(decoder.error)


def _serve_deferred(
    watched: Watched, store: DeferringStore, stats: ServerStats, bucket: Bucket | None
) -> None:
    """The loop for a store that answers later (Redis): each read's
    increments go to the store and the loop reads on, while the store's side
    writes the replies (``Outbox``). Same outcomes as ``_serve``. Blocking
    steps: ``recv``, ``outbox.submit`` (a pipelined read waits for the
    previous one's replies), ``outbox.settle`` and, over the rate,
    ``watched.paid`` and ``watched.read_size``."""
    decoder = watched.decoder
    incoming = Reader(watched.sock)
    outbox = Outbox(watched, incoming, stats)
    feed = decoder.feed
    recv = incoming.recv
    submit = outbox.submit
    read_size = RECV_SIZE
    read_ended = False  # the peer closed, or the reaper or shutdown cut the read side
    try:
        if bucket is not None:
            tokens = bucket.take(0)[1]
            read_size, tokens = watched.read_size(bucket, tokens, RECV_SIZE)
        while not watched.stopped:
            chunk = recv(read_size)
            if outbox.ending is not None:  # the store's side ended it (and woke the recv)
                break
            if not chunk:
                read_ended = True
                break
            watched.bytes_in += len(chunk)
            increments = feed(chunk)
            while increments and outbox.ending is None:
                later = None
                if bucket is not None:
                    increments, later, tokens = watched.paid(bucket, increments)
                submit(store, increments)
                increments = later
            if bucket is not None:
                read_size, tokens = watched.read_size(bucket, tokens, RECV_SIZE)
            if decoder.error is not None or outbox.ending is not None:
                break
    except BaseException:
        with contextlib.suppress(ConnectionEnded):
            outbox.settle()  # the replies owed still go out; this ending wins
        raise
    outbox.settle()  # every reply owed is written; raises the store side's ending
    if decoder.error is not None:
        raise FrameRefused(decoder.error)
    if read_ended:
        _read_side_ended(watched)


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


def close_gently(sock: socket.socket) -> None:
    """Half-close so the replies already sent arrive, drain briefly, close."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(RECV_SIZE)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()
