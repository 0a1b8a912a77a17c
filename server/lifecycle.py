"""The server's lifecycle: accept connections into a bounded greenlet pool,
hand each to the connection loop, and stop gracefully.

Modelled on gevent's own ``StreamServer``: ``start()``, then ``stop()`` which
stops accepting, stops reading new frames, lets every connection send the
replies it owes, and cuts whatever is still running after the timeout.

**Pool saturation** (``SaturationWatch``): when every pool slot is busy,
gevent stops accepting and new connections wait in the kernel's listen
queue; the watch notices, counts it, tells the operator (rate-limited) and
lets the server free slots held by idle connections. On Linux the queue's
length is read from the listening socket's TCP_INFO (``tcpi_unacked`` holds
the accept-queue length there).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from gevent import GreenletExit
from gevent.pool import Pool
from gevent.server import StreamServer

from counter_server.common.ratelog import RateLimitedLog
from counter_server.common.values import format_address, phrase
from counter_server.server.connection import close_gently, serve
from counter_server.server.errors import (
    ClientTimeout,
    CloseReason,
    ConnectionEnded,
    HandshakeFailed,
    PeerClosed,
    Stopped,
)
from counter_server.server.limits import Bucket, client_ip, limits_for, peer_key
from counter_server.server.stats import ServerStats
from counter_server.server.store import CounterStore
from counter_server.server.timeouts import TimeoutReaper, Watched

if TYPE_CHECKING:
    from counter_server.server.cli import ServerSettings
    from counter_server.server.workers import Seat

log = logging.getLogger("counter.server")

ACCEPT_RETRY_SECONDS = 0.1  # pause accepting this long when out of descriptors
HANDSHAKE_TIMEOUT = 10.0  # seconds for a TLS handshake when --frame-timeout is 0
# accept() errors that mean "no descriptors now" (per process, system-wide)...
OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE}
# ... or "no descriptors or memory now": not a bug.
_OUT_OF_RESOURCES = OUT_OF_DESCRIPTORS | {errno.ENOBUFS, errno.ENOMEM}

CHECK_INTERVAL = 0.5  # seconds between two looks at the pool and the listen queue
# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked.
_TCP_INFO_QUEUE = struct.Struct("=8x16xI")


# Endings after which the client may still be sending: half-close and drain
# (close_gently), so that what we last sent reaches it instead of being
# destroyed by the reset a close with unread input causes: the replies owed
# before a refused frame or at shutdown, the TLS alert saying why a
# handshake was refused.
CLOSE_GENTLY = frozenset({CloseReason.REFUSED, CloseReason.SHUTDOWN, CloseReason.TLS_FAILED})


class _Connection:
    """One accepted connection while it is handled: what its close must undo."""

    __slots__ = ("address", "admitted", "bucket", "conn", "ip", "key", "sock", "watched")

    def __init__(self, sock: socket.socket, address: tuple, ipv6_prefix: int) -> None:
        self.sock = sock
        self.conn: socket.socket = sock  # the TLS socket once the handshake starts
        self.address = address
        self.ip = client_ip(address)
        self.key = peer_key(self.ip, ipv6_prefix)  # what per-IP limits count
        self.admitted = False
        self.bucket: Bucket | None = None
        self.watched: Watched | None = None  # by the reaper, once admitted


class PausingAcceptor:
    """For a gevent StreamServer: stop accepting for a while, then resume
    (unless the server was closed meanwhile)."""

    def pause_accepting(self, seconds: float) -> None:
        self.stop_accepting()
        gevent.spawn_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if not self.closed:
            self.start_accepting()


class _Acceptor(PausingAcceptor, StreamServer):
    """gevent's StreamServer, but running out of file descriptors while
    accepting pauses accepting briefly and is reported in one log line,
    instead of a traceback per attempt; and, when other worker processes
    accept on the same socket (``seat``), one connection per wake-up, and
    none while this worker is ahead of the others (server.workers.AcceptBalance)."""

    def __init__(self, *args, on_accept_error, seat: Seat | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_accept_error = on_accept_error
        self._seat = seat
        self._paused = False  # stepped back last time: take the next one regardless
        if seat is not None:
            self.max_accept = 1  # not gevent's 100 in a row: let the others have a turn

    def do_read(self):
        seat = self._seat
        if seat is not None:
            if not self._paused and seat.ahead():
                self._paused = True
                self.pause_accepting(seat.pause)
                return None
            self._paused = False
        try:
            return super().do_read()
        except ConnectionAbortedError:
            return None  # the peer gave up before we accepted: nothing to serve
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            self._on_accept_error(exc)
            self.pause_accepting(ACCEPT_RETRY_SECONDS)
            return None


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


class CounterServer:
    """Serves the counter protocol on ``listener`` with at most ``pool_size``
    connections at once; further connections wait in the listen backlog."""

    def __init__(
        self,
        listener: socket.socket,
        store: CounterStore,
        settings: ServerSettings,
        tls: ssl.SSLContext | None = None,
        seat: Seat | None = None,
    ) -> None:
        """With ``--processes``, ``seat`` is this worker's place among them:
        how new connections are spread, and the limits table they share."""
        self.store = store
        self.stats = ServerStats()
        self.timeouts = timeouts = settings.timeouts
        self.reaper = TimeoutReaper(timeouts)
        self.limits = limits_for(
            settings.allow, settings.max_conns_per_ip, settings.rate, settings.burst,
            seat.peers if seat is not None else None, seat.index if seat is not None else 0,
        )  # fmt: skip
        self.tls = tls
        self.ipv6_prefix = settings.ipv6_prefix
        self.pool = Pool(settings.pool_size)
        self.stopping = False
        self._seat = seat
        self._stream_server = _Acceptor(
            listener, self._handle, spawn=self.pool, on_accept_error=self._accept_failed,
            seat=seat,
        )  # fmt: skip
        self._events = RateLimitedLog(log)
        self._seen_errors: set[tuple] = set()
        self._saturation = SaturationWatch(
            listener, self.pool, self.stats, self._events, relieve=self._evict_idle
        )

    @property
    def bytes_in(self) -> int:
        """Bytes read from clients, live connections included."""
        return self.stats.bytes_in + sum(w.bytes_in for w in self.reaper.watched)

    @property
    def bytes_out(self) -> int:
        """Bytes written to clients, live connections included."""
        return self.stats.bytes_out + sum(w.bytes_out for w in self.reaper.watched)

    @property
    def address(self) -> str:
        """The listening address as ``host:port``."""
        return format_address(self._stream_server.socket.getsockname())

    def start(self) -> None:
        """Start accepting connections (returns at once; serving runs in greenlets)."""
        if self._seat is not None:
            self._seat.serving(len(self.pool))
        self._stream_server.start()
        self._saturation.start()
        self.reaper.start()

    def stop(self, timeout: float) -> int:
        """Stop gracefully within ``timeout`` seconds; return how many
        connections had to be cut because they did not finish in time.
        The store stays open: its owner closes it."""
        self.stopping = True
        if self._seat is not None:
            self._seat.absent()
        self._saturation.stop()
        self._stream_server.close()
        self.reaper.stop_reading()
        cut = 0
        if not self.pool.join(timeout=timeout):
            cut = len(self.pool)
            log.warning(
                "%d connections did not finish within the %.1fs shutdown timeout; closing them",
                cut,
                timeout,
            )
            self.pool.kill(block=True, timeout=1.0)
        self.reaper.stop()
        return cut

    def _evict_idle(self, waiting: int) -> int:
        """The pool is full and ``waiting`` connections wait: close as many
        connections idle for ``--evict-idle-after`` seconds (0: none)."""
        if self.timeouts.evict_idle is None:
            return 0
        return self.reaper.evict_idle(self.timeouts.evict_idle, waiting)

    def _accept_failed(self, exc: OSError) -> None:
        self.stats.accept_errors += 1
        self._events.log(
            "accept",
            logging.WARNING,
            "cannot accept connections: %s (raise the open-file limit, ulimit -n, or lower "
            "--multiplier); retrying",
            phrase(exc),
            extra={"error": phrase(exc)},
        )

    def _handle(self, sock: socket.socket, address: tuple) -> None:
        """Serve one accepted connection, then account for it and close it,
        however it ended (gevent's ``_handle_and_close_when_done``)."""
        self.stats.connections_accepted += 1
        self._publish_load(len(self.pool))
        connection = _Connection(sock, address, self.ipv6_prefix)
        ended = ConnectionEnded()  # a bug, unless something better is known
        try:
            self._serve_admitted(connection)
        except ConnectionEnded as exc:
            ended = exc
        except OSError as exc:
            ended = ConnectionEnded(phrase(exc), CloseReason.RESET)
        except GreenletExit:
            ended = ConnectionEnded("", CloseReason.SHUTDOWN_TIMEOUT)
            raise
        except Exception as exc:
            self._unexpected(address, exc)
        finally:
            self._closed(connection, ended)

    def _serve_admitted(self, connection: _Connection) -> None:
        """Admit the connection and serve it; raises how it ended
        (ConnectionEnded, or OSError from the socket)."""
        if self.limits is not None:
            connection.bucket = self.limits.admit(connection.ip, connection.key)  # or TurnedAway
            connection.admitted = True
        if self.stopping:
            raise Stopped()
        connection.watched = self.reaper.watch(connection.sock)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            self._handshake(connection)
            if self.stopping:
                raise Stopped()
        serve(connection.watched, self.store, self.stats, connection.bucket)
        raise Stopped() if connection.watched.stopped else PeerClosed()

    def _closed(self, connection: _Connection, ended: ConnectionEnded) -> None:
        """The one place a connection is counted, released, logged and closed."""
        reason = ended.reason
        self.stats.connections_closed[reason] += 1
        if ended.rejected is not None:
            self.stats.rejected[ended.rejected] += 1
        self._publish_load(len(self.pool) - 1)  # this handler leaves the pool next
        if connection.admitted:
            self.limits.release(connection.key)
        if connection.watched is not None:
            self.reaper.forget(connection.watched)
            self.stats.bytes_in += connection.watched.bytes_in
            self.stats.bytes_out += connection.watched.bytes_out
        if reason is not CloseReason.ERROR and log.isEnabledFor(ended.level):  # ERROR: logged
            peer = format_address(connection.address)
            self._events.log(
                ended.event,
                ended.level,
                "%s",
                ended.describe(peer),
                extra={"peer": peer, "reason": ended.label, "detail": str(ended)},
            )
        if reason in CLOSE_GENTLY:
            close_gently(connection.conn)
        connection.conn.close()
        if connection.conn is not connection.sock:
            connection.sock.close()

    def _publish_load(self, serving: int) -> None:
        """Tell the other workers how many connections this one handles."""
        if self._seat is not None and not self.stopping:
            self._seat.serving(serving)

    def _handshake(self, connection: _Connection) -> None:
        """The TLS handshake; the whole of it must finish within the frame
        timeout (or 10 s), however the client trickles its bytes, and it
        gives way to waiting clients under pool pressure like an idle
        connection. HandshakeFailed if it fails, ClientTimeout if it is too
        slow, the reaper's verdict if it was evicted or stopped. The TLS
        socket becomes ``connection.conn`` first (it takes over the
        descriptor), so a failure is closed through it, gently."""
        limit = self.timeouts.frame or HANDSHAKE_TIMEOUT
        watched = connection.watched
        try:
            with (
                self.reaper.handshake(watched),
                gevent.Timeout(limit, ClientTimeout(CloseReason.HANDSHAKE_TIMEOUT, limit)),
            ):
                connection.conn = self.tls.wrap_socket(
                    connection.sock, server_side=True, do_handshake_on_connect=False
                )
                watched.wrapped(connection.conn)
                connection.conn.do_handshake()
        except OSError as exc:  # ssl.SSLError included
            if watched.verdict is not None:
                raise watched.verdict from None
            raise HandshakeFailed(phrase(exc)) from None

    def _unexpected(self, address: tuple, exc: Exception) -> None:
        """Log a bug: with its traceback the first time it happens at that
        place, as one line after that."""
        where = traceback.extract_tb(exc.__traceback__)[-1]
        key = (type(exc), where.filename, where.lineno)
        first = key not in self._seen_errors
        self._seen_errors.add(key)
        self._events.log(
            "unexpected",
            logging.ERROR,
            "unexpected error serving %s; connection closed: %r",
            format_address(address),
            exc,
            exc_info=first,
            extra={"peer": format_address(address), "error": repr(exc)},
        )
