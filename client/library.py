"""``CounterClient``: the counter server's client library for threads and
greenlets (plain sockets and ``threading``, so it cooperates with gevent once
gevent has monkey-patched them, and runs in plain threads otherwise).

Each call borrows one persistent connection from a small pool, sends its
frames in one write, reads their replies and gives the connection back, so
replies never cross between callers. A connection that failed is dropped and
the next call opens a new one. Increments are never retried: a frame that
went out without a reply raises ``Indeterminate``.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections.abc import Iterable
from types import TracebackType

from counter_server.common.tls import speaks_tls as speaks_tls_at
from counter_server.protocol import FRAME_SIZE, REPLY_SIZE

from .calls import (
    DEFAULT_POOL_SIZE,
    DEFAULT_TIMEOUT,
    HTTP_NUDGE,
    IN_FLIGHT_FRAMES,
    PROCESS,
    READ_ATTEMPTS,
    READ_FRAME,
    ConnectionEnded,
    Deadline,
    Target,
    can_classify,
    check_pool_size,
    decode_call,
    encode_call,
    ended_early,
    foreign,
    may_want_tls,
    not_served,
    nudge_margin,
    outgoing,
    reason,
    speaks_tls,
    split_probe,
    target,
)
from .errors import CounterError, Unavailable


def _connect(where: Target, deadline: Deadline) -> socket.socket:
    """A new connection (TLS handshake done) within the call's ``deadline``;
    Unavailable if there is none."""
    try:
        sock = socket.create_connection((where.host, where.port), timeout=_left(deadline))
    except OSError as exc:
        raise Unavailable(f"cannot connect to {where.address}: {reason(exc)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if where.tls is None:
        return sock
    try:
        sock.settimeout(_left(deadline))
        return where.tls.wrap_socket(sock, server_hostname=where.server_hostname)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise Unavailable(f"TLS with {where.address} failed: {reason(exc)}") from None


def _speaks_tls(where: Target, deadline: Deadline) -> bool:
    """Whether the server completes a TLS handshake (within ``deadline``)."""
    left = deadline.left()
    return left > 0 and speaks_tls_at(where.host, where.port, left)


def _still_open(sock: socket.socket) -> bool:
    """False if an idle connection was closed by the server meanwhile (or
    holds bytes nobody asked for): it must not carry a frame."""
    raw = getattr(sock, "_sock", None)
    if raw is not None and hasattr(sock, "_read_event") and not isinstance(sock, ssl.SSLSocket):
        # A plain gevent socket (monkey-patched): its own socket is
        # non-blocking, so one peek answers without gevent's select.
        try:
            raw.recv(1, socket.MSG_PEEK)  # EOF or stray bytes: not usable
            return False
        except BlockingIOError:
            return True
        except OSError:
            return False
    try:
        if not select.select([sock], [], [], 0)[0]:
            return True
        sock.setblocking(False)
        try:
            sock.recv(1)  # EOF, a reset, or unexpected bytes
        except (BlockingIOError, ssl.SSLWantReadError):
            return True  # only TLS housekeeping (a session ticket) was there
        finally:
            sock.setblocking(True)  # each call sets its timeout
        return False
    except (OSError, ValueError):
        return False


RECV_BYTES = 65536  # at most one read's worth of replies (8,192), not a buffer the size of a batch


def _left(deadline: Deadline) -> float:
    """Seconds left for the next socket operation; TimeoutError once none."""
    left = deadline.left()
    if left <= 0:
        raise TimeoutError("no time left")
    return left


def _exchange(
    sock: socket.socket, frames: bytes, expected: int, deadline: Deadline, fresh: bool = False
) -> tuple[bytes, bool]:
    """Send ``frames`` and read ``expected`` reply bytes, keeping at most
    ``IN_FLIGHT_FRAMES`` unanswered, so that a batch of any size streams
    (the server stops reading a connection whose replies are not read);
    ConnectionEnded (with what arrived) if the connection ends first. The
    replies' bytes, and whether the connection can carry another call (not
    once nudged: a ``fresh`` one whose server stayed silent, see HTTP_NUDGE)."""
    out = memoryview(frames)
    sent = 0
    data = bytearray()
    margin = nudge_margin(deadline.timeout) if fresh else 0.0
    nudged = False
    extra = REPLY_SIZE if fresh else 0  # room to see an HTTP status line whole
    while len(data) < expected:
        unanswered = sent // FRAME_SIZE - len(data) // REPLY_SIZE
        if sent < len(out) and unanswered < IN_FLIGHT_FRAMES:
            chunk = out[sent : sent + (IN_FLIGHT_FRAMES - unanswered) * FRAME_SIZE]
            try:
                sock.settimeout(_left(deadline))
                sock.sendall(chunk)
            except OSError as exc:
                raise ConnectionEnded(f"sending failed ({reason(exc)})", bytes(data), exc) from None
            sent += len(chunk)
            continue
        # Only a call sent whole and still unanswered is nudged: no frame follows the nudge.
        may_nudge = margin and not nudged and not data and sent == len(out)
        try:
            sock.settimeout(max(_left(deadline) - (margin if may_nudge else 0.0), 0.001))
            chunk = sock.recv(min(expected - len(data), RECV_BYTES) + extra)
            if not chunk:
                raise ConnectionEnded("the server closed the connection", bytes(data))
        except TimeoutError:
            if not may_nudge:
                why = "no reply within the timeout"
                raise ConnectionEnded(why, bytes(data), TimeoutError(why)) from None
            nudged = True
            try:
                sock.sendall(HTTP_NUDGE)
            except OSError as exc:
                raise ConnectionEnded(f"sending failed ({reason(exc)})", b"", exc) from None
            continue
        except OSError as exc:
            why = f"the connection broke ({reason(exc)})"
            raise ConnectionEnded(why, bytes(data), exc) from None
        data += chunk
        if extra and (wrong := foreign(data, expected)):
            raise ConnectionEnded(str(wrong), b"", wrong)
        deadline.progressed()
    return bytes(data), not nudged


class CounterClient:
    """A client of one counter server, safe to share between threads and
    greenlets.

    ``address`` is ``HOST:PORT`` (``[::1]:8080`` for IPv6). ``timeout``
    bounds each connect, TLS handshake and call. ``pool_size`` persistent
    connections at most; callers beyond it wait for one. TLS: ``tls`` an
    ``ssl.SSLContext``, or ``tls_ca`` (the CA file to verify the server
    with), ``tls_cert`` and ``tls_key`` (a client certificate, for mutual
    TLS). Bad settings raise ``ValueError`` at once; nothing connects until
    the first call.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        pool_size: int = DEFAULT_POOL_SIZE,
        tls: ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self._target = target(address, timeout, tls, tls_ca, tls_cert, tls_key, server_hostname)
        self._pool_size = check_pool_size(pool_size)
        self._closed = False
        self._floor: int | None = None  # the highest value seen: the counter is at least that
        self._own()

    def _own(self) -> None:
        """Start this process's pool: a forked child never touches the
        connections (or a lock held by a thread) of its parent."""
        self._generation = PROCESS.generation
        self._slots = threading.BoundedSemaphore(self._pool_size)
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return self._target.address

    def increment(self, n: int = 1) -> int:
        """Add ``n`` (0..2^64 - 1) and return the counter right after it.
        Raises ``Unavailable`` (not sent), ``Refused`` (would pass 2^64 - 1;
        not applied) or ``Indeterminate`` (sent, no reply: maybe applied)."""
        return self._call([n])[0]

    def increment_many(self, increments: Iterable[int]) -> list[int]:
        """Add each increment in order, pipelined in one round trip; the
        counter right after each. On an error, ``exc.replies`` holds the
        replies that came (those increments were applied); of the rest, the
        first is refused or indeterminate as for ``increment``."""
        return self._call(increments)

    def read(self) -> int:
        """The counter's current value (a zero increment). Retried on a new
        connection after a failure; ``Unavailable`` if every attempt fails."""
        failure: CounterError | None = None
        for _ in range(READ_ATTEMPTS):
            try:
                return self._call([0])[0]
            except Unavailable as exc:
                failure = exc
                if self._closed:
                    break
            except CounterError as exc:
                failure = exc
        raise Unavailable(f"cannot read the counter: {failure}") from None

    def _call(self, increments: Iterable[int]) -> list[int]:
        checked, frames = encode_call(increments)
        if not checked:
            return []
        if self._generation != PROCESS.generation:
            self._own()
        where, floor = self._target, self._floor
        frames = outgoing(where.address, floor, checked, frames)
        expected = len(frames) // FRAME_SIZE * REPLY_SIZE
        deadline = Deadline(where.timeout)
        if not self._slots.acquire(False) and not self._slots.acquire(timeout=deadline.left()):
            raise Unavailable(f"no connection to {where.address} free within the timeout")
        try:
            sock, fresh = self._borrow(deadline)
            if not deadline.left():
                self._give_back(sock)
                raise Unavailable(f"{where.address}: timed out before sending")
            try:
                data, reusable = _exchange(sock, frames, expected, deadline, fresh)
            except ConnectionEnded as ended:
                sock.close()
                raise self._outcome(ended, fresh, checked, floor, deadline) from None
            except BaseException:
                sock.close()
                raise
            if reusable:
                self._give_back(sock)
            else:
                sock.close()
        finally:
            self._slots.release()
        _, replies = split_probe(decode_call(data), floor)
        if floor is None or replies[-1] > floor:  # a race between threads only keeps it lower
            self._floor = replies[-1]
        return replies

    def _outcome(
        self,
        ended: ConnectionEnded,
        fresh: bool,
        checked: list[int],
        floor: int | None,
        deadline: Deadline,
    ) -> CounterError:
        """What became of a call whose connection (``fresh``: opened for it)
        ended early: a server that refused our TLS side or wants TLS read
        nothing (``Unavailable``); otherwise as ``calls.ended_early`` says."""
        where = self._target
        unserved = not_served(where.address, fresh, ended)
        if unserved is not None:
            return unserved
        floor, replies = split_probe(decode_call(ended.data), floor)
        now = self._value_now(deadline) if can_classify(checked, replies) else None
        if isinstance(now, ConnectionEnded):
            # Both cut at once, the read too: a TLS server, or a server
            # refusing us before reading any frame (never a probe's victim).
            cut = may_want_tls(where, fresh, ended) and may_want_tls(where, True, now)
            if cut and _speaks_tls(where, deadline):
                return speaks_tls(where.address)
            now = None
        self._saw(now, *replies[-1:], floor)
        return ended_early(where.address, checked, replies, floor, now, ended.why)

    def _saw(self, *values: int | None) -> None:
        """Raise the floor: the counter was each of ``values`` (None: not
        known), so it is at least the highest for ever. (A race between
        threads only keeps the floor lower: still true.)"""
        known = [v for v in values if v is not None]
        if known and (self._floor is None or max(known) > self._floor):
            self._floor = max(known)

    def _value_now(self, deadline: Deadline) -> int | ConnectionEnded | None:
        """After a connection ended early: the counter, read on a fresh
        connection within what is left of the call's deadline, to tell a
        refusal from an unknown outcome; how that read's connection ended if
        it did, None if none could be opened."""
        try:
            sock = _connect(self._target, deadline)
        except (Unavailable, TimeoutError):
            return None
        try:
            return decode_call(_exchange(sock, READ_FRAME, REPLY_SIZE, deadline)[0])[0]
        except ConnectionEnded as ended:
            return ended
        finally:
            sock.close()

    def _borrow(self, deadline: Deadline) -> tuple[socket.socket, bool]:
        """An idle connection still open, or a new one; and whether it is new."""
        while True:
            with self._lock:
                if self._closed:
                    raise Unavailable(f"the client of {self.address} is closed")
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return _connect(self._target, deadline), True
            if _still_open(sock):
                return sock, False
            sock.close()

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close every idle connection; calls after it raise ``Unavailable``
        (calls in progress finish on their connection, then close it)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def __enter__(self) -> CounterClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CounterClient({self.address!r})"
