"""The server's lifecycle: accept connections into a bounded greenlet pool,
hand each to the connection loop, and stop gracefully.

Modelled on gevent's own ``StreamServer``: ``start()``, then ``stop()`` which
stops accepting, stops reading new frames, lets every connection send the
replies it owes, and cuts whatever is still running after the timeout.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import traceback

import gevent
from gevent import GreenletExit
from gevent.pool import Pool
from gevent.server import StreamServer

from common.cli import format_address
from protocol import InvalidFrame, RejectReason
from server.admission import Admission, client_ip
from server.connection import close_after_refusal, serve
from server.ratelimit import RateLimiter
from server.ratelog import RateLimitedLog
from server.saturation import SaturationWatch
from server.stats import CLOSE_REASONS, ServerStats
from server.store import CounterStore, StoreUnavailable
from server.timeouts import DEFAULT_TIMEOUTS, ClientTimeout, TimeoutReaper, Timeouts, shut_down

log = logging.getLogger("counter.server")

ACCEPT_RETRY_SECONDS = 0.1
HANDSHAKE_TIMEOUT = 10.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class HandshakeFailed(Exception):
    """The TLS handshake did not complete (bad certificate, not TLS, timeout)."""


class _Acceptor(StreamServer):
    """gevent's StreamServer, but running out of file descriptors while
    accepting pauses accepting briefly and is reported in one log line,
    instead of a traceback per attempt."""

    def __init__(self, *args, on_accept_error, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_accept_error = on_accept_error

    def do_read(self):
        try:
            return super().do_read()
        except ConnectionAbortedError:
            return None  # the peer gave up before we accepted: nothing to serve
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            self._on_accept_error(exc)
            self.stop_accepting()
            gevent.spawn_later(ACCEPT_RETRY_SECONDS, self._resume_accepting)
            return None

    def _resume_accepting(self) -> None:
        if not self.closed:
            self.start_accepting()


class CounterServer:
    """Serves the counter protocol on ``listener`` with at most ``pool_size``
    connections at once; further connections wait in the listen backlog."""

    def __init__(
        self,
        listener: socket.socket,
        store: CounterStore,
        pool_size: int,
        *,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        admission: Admission | None = None,
        rate_limiter: RateLimiter | None = None,
        tls: ssl.SSLContext | None = None,
        stats: ServerStats | None = None,
    ) -> None:
        self.store = store
        self.stats = stats if stats is not None else ServerStats()
        self.timeouts = timeouts
        self.reaper = TimeoutReaper(timeouts)
        self.admission = admission if admission is not None and admission.active else None
        self.rate_limiter = rate_limiter
        self.tls = tls
        self.pool = Pool(pool_size)
        self.stopping = False
        self._stream_server = _Acceptor(
            listener, self._handle, spawn=self.pool, on_accept_error=self._accept_failed
        )
        self._events = RateLimitedLog(log)
        self._seen_errors: set[tuple] = set()
        self._saturation = SaturationWatch(listener, self.pool, self.stats, self._events)

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
        self._stream_server.start()
        self._saturation.start()
        self.reaper.start()

    def stop(self, timeout: float) -> int:
        """Stop gracefully within ``timeout`` seconds; return how many
        connections had to be cut because they did not finish in time."""
        self.stopping = True
        self._saturation.stop()
        self._stream_server.close()
        for watched in list(self.reaper.watched):
            shut_down(watched.sock, socket.SHUT_RD)
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
        self.store.close()
        return cut

    def _accept_failed(self, exc: OSError) -> None:
        self.stats.accept_errors += 1
        self._events.log(
            "accept",
            logging.WARNING,
            "cannot accept connections: %s (raise the open-file limit, ulimit -n, or lower "
            "--multiplier); retrying",
            os.strerror(exc.errno).lower(),
        )

    def _handle(self, sock: socket.socket, address: tuple) -> None:
        stats = self.stats
        stats.connections_accepted += 1
        ip = client_ip(address)
        refused_by = self.admission.admit(ip) if self.admission is not None else None
        bucket = None
        if refused_by is None and self.rate_limiter is not None:
            bucket = self.rate_limiter.acquire(ip)
        conn = sock
        refusal = None
        reason, detail = refused_by or "shutdown", ""
        try:
            if refused_by is None and not self.stopping:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is not None:
                    conn = self._handshake(sock)
                if not self.stopping:
                    refusal = serve(conn, self.store, stats, self, self.reaper, bucket)
                if refusal is not None and refusal.reason is not RejectReason.TRUNCATED:
                    reason = "refused"
                elif not self.stopping:
                    reason = "peer_closed"
        except ClientTimeout as exc:
            reason, detail = exc.reason, str(exc)
        except StoreUnavailable as exc:
            reason, detail = "backend_unavailable", str(exc)
        except HandshakeFailed as exc:
            reason, detail = "tls_failed", str(exc)
        except OSError as exc:
            reason, detail = "reset", exc.strerror or str(exc)
        except GreenletExit:
            reason = "shutdown_timeout"
            raise
        except Exception as exc:
            reason = "error"
            self._unexpected(address, exc)
        finally:
            stats.connections_closed[reason] += 1
            if refused_by is None and self.admission is not None:
                self.admission.release(ip)
            if bucket is not None:
                self.rate_limiter.release(ip)
            if refusal is not None:
                self._refuse(conn, address, refusal)
            elif reason != "error":
                self._events.log(
                    f"closed:{reason}",
                    logging.WARNING if CLOSE_REASONS[reason] else logging.INFO,
                    "connection from %s closed: %s%s",
                    format_address(address),
                    reason.replace("_", " "),
                    f" ({detail})" if detail else "",
                )
            conn.close()
            if conn is not sock:
                sock.close()

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        """The TLS handshake, bounded by the frame timeout (or 10 s);
        HandshakeFailed if it does not complete."""
        try:
            conn = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            conn.settimeout(self.timeouts.frame or HANDSHAKE_TIMEOUT)
            conn.do_handshake()
        except OSError as exc:  # ssl.SSLError and TimeoutError included
            raise HandshakeFailed(exc.strerror or str(exc) or type(exc).__name__) from None
        conn.settimeout(None)  # from here on the reaper enforces the timeouts
        return conn

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
        )

    def _refuse(self, sock: socket.socket, address: tuple, refusal: InvalidFrame) -> None:
        self.stats.rejected[refusal.reason] += 1
        truncated = refusal.reason is RejectReason.TRUNCATED
        self._events.log(
            refusal.reason.value,
            logging.INFO if truncated else logging.WARNING,
            "%s from %s (%s): %s; %s",
            "discarded partial frame" if truncated else "refused frame",
            format_address(address),
            refusal.reason.value,
            refusal,
            "peer had closed" if truncated else "connection closed",
        )
        if not truncated:
            close_after_refusal(sock)
