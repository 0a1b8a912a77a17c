"""Socket helpers shared by the server and the client: a cheaper ``recv``
for hot loops, and a shutdown that wakes whoever is blocked on a socket."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable

from gevent import ssl as gevent_ssl
from gevent.hub import Waiter

_TLS_SOCKETS = (ssl.SSLSocket, gevent_ssl.SSLSocket)  # patched or not


def _plain_gevent(sock: socket.socket) -> socket.socket | None:
    """The underlying non-blocking socket of a plain (not TLS) gevent socket
    without a timeout, or None for any other socket."""
    raw = getattr(sock, "_sock", None)
    if (
        raw is None
        or isinstance(sock, _TLS_SOCKETS)
        or not hasattr(sock, "_read_event")
        or sock.gettimeout() is not None
    ):
        return None
    return raw


def raw_send(sock: socket.socket) -> Callable[[bytes], int] | None:
    """For a plain gevent socket, its underlying non-blocking ``send``: it
    returns the bytes taken and raises BlockingIOError instead of waiting
    (no gevent wrapper on the way). None for any other socket."""
    raw = _plain_gevent(sock)
    return None if raw is None else raw.send


class Reader:
    """``recv`` for a hot loop that owns a plain gevent socket (no TLS, no
    timeout).

    A read shorter than asked means the kernel buffer is empty: the next read
    first waits for the socket to become readable, instead of trying a recv
    that fails with EAGAIN (a syscall, a raised and caught exception and a
    thrown-away buffer per ping-pong request) and then waiting; after a full
    read it reads straight away. Another greenlet can ``interrupt()`` it: the
    pending ``recv`` and every later one return b"" at once, without touching
    the socket (so it stays usable for an orderly close).
    """

    __slots__ = ("_drained", "_hub", "_raw_recv", "_readable", "_waiter", "interrupted")

    def __init__(self, sock: socket.socket) -> None:
        raw = _plain_gevent(sock)
        if raw is None:
            raise TypeError("Reader needs a plain gevent socket without a timeout")
        self._raw_recv = raw.recv
        self._readable = sock._read_event
        self._hub = sock.hub
        self._drained = False
        self._waiter: Waiter | None = None  # while recv waits for readability
        self.interrupted = False

    @staticmethod
    def supports(sock: socket.socket) -> bool:
        """Whether ``sock`` is a socket this reader can serve."""
        return _plain_gevent(sock) is not None

    def recv(self, size: int) -> bytes:
        while not self.interrupted:
            if self._drained:
                # What the hub's wait() does, with a waiter of our own, so that
                # interrupt() can wake exactly this wait and no later one.
                waiter = self._waiter = Waiter(self._hub)
                self._readable.start(waiter.switch, None)
                try:
                    waiter.get()
                finally:
                    self._readable.stop()
                    self._waiter = None
                if self.interrupted:
                    break
            try:
                data = self._raw_recv(size)
            except BlockingIOError:
                self._drained = True
                continue
            self._drained = len(data) < size
            return data
        return b""

    def interrupt(self) -> None:
        """Make the pending ``recv`` (if any) and all later ones return b""."""
        self.interrupted = True
        waiter = self._waiter
        if waiter is not None:  # a stale switch only stores a value: harmless
            self._hub.loop.run_callback(waiter.switch, None)


def reader(sock: socket.socket) -> Callable[[int], bytes]:
    """``Reader(sock).recv`` where the socket allows it; any other socket
    (TLS, which can hold decrypted bytes while the descriptor is not
    readable; one with a timeout; a plain stdlib one) keeps its own recv."""
    return Reader(sock).recv if Reader.supports(sock) else sock.recv


def shut_down(sock: socket.socket, how: int) -> None:
    """Shut down ``sock`` in the kernel, waking any greenlet blocked on it,
    through a duplicate descriptor so gevent's own watchers are left alone
    (works under TLS too, and keeps the write side usable for SHUT_RD)."""
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as duplicate:
            duplicate.shutdown(how)
    except OSError:
        pass
