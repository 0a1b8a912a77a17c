"""The server's lifecycle: accept connections into a bounded greenlet pool,
hand each to the connection loop, and stop gracefully.

Modelled on gevent's own ``StreamServer``: ``start()``, then ``stop()`` which
stops accepting, stops reading new frames, lets every connection send the
replies it owes, and cuts whatever is still running after the timeout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import traceback

import gevent
from gevent import GreenletExit
from gevent.pool import Pool
from gevent.server import StreamServer

from common.cli import format_address
from protocol import InvalidFrame, RejectReason
from server.connection import close_after_refusal, serve
from server.ratelog import RateLimitedLog
from server.saturation import SaturationWatch
from server.stats import ServerStats
from server.store import CounterStore

log = logging.getLogger("counter.server")

ACCEPT_RETRY_SECONDS = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


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
        stats: ServerStats | None = None,
    ) -> None:
        self.store = store
        self.stats = stats if stats is not None else ServerStats()
        self.pool = Pool(pool_size)
        self.stopping = False
        self._connections: set[socket.socket] = set()
        self._stream_server = _Acceptor(
            listener, self._handle, spawn=self.pool, on_accept_error=self._accept_failed
        )
        self._events = RateLimitedLog(log)
        self._seen_errors: set[tuple] = set()
        self._saturation = SaturationWatch(listener, self.pool, self.stats, self._events)

    @property
    def address(self) -> str:
        """The listening address as ``host:port``."""
        return format_address(self._stream_server.socket.getsockname())

    def start(self) -> None:
        """Start accepting connections (returns at once; serving runs in greenlets)."""
        self._stream_server.start()
        self._saturation.start()

    def stop(self, timeout: float) -> int:
        """Stop gracefully within ``timeout`` seconds; return how many
        connections had to be cut because they did not finish in time."""
        self.stopping = True
        self._saturation.stop()
        self._stream_server.close()
        for sock in list(self._connections):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        cut = 0
        if not self.pool.join(timeout=timeout):
            cut = len(self.pool)
            log.warning(
                "%d connections did not finish within the %.1fs shutdown timeout; closing them",
                cut,
                timeout,
            )
            self.pool.kill(block=True, timeout=1.0)
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
        stats.connections_active += 1
        self._connections.add(sock)
        refusal = None
        reason, detail = "shutdown", ""
        try:
            if not self.stopping:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                refusal = serve(sock, self.store, stats, self)
                if refusal is not None and refusal.reason is not RejectReason.TRUNCATED:
                    reason = "refused"
                elif not self.stopping:
                    reason = "peer_closed"
        except OSError as exc:
            reason = "reset"
            detail = exc.strerror or str(exc)
        except GreenletExit:
            reason = "shutdown_timeout"
            raise
        except Exception as exc:
            reason = "error"
            self._unexpected(address, exc)
        finally:
            self._connections.discard(sock)
            stats.connections_active -= 1
            stats.connections_closed[reason] += 1
            if refusal is not None:
                self._refuse(sock, address, refusal)
            elif reason != "error":
                self._events.log(
                    f"closed:{reason}",
                    logging.INFO,
                    "connection from %s closed: %s",
                    format_address(address),
                    detail if reason == "reset" else reason.replace("_", " "),
                )
            sock.close()

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
