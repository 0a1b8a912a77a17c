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
import time
from collections.abc import Iterable
from types import TracebackType

from counter_server.common.tls import speaks_tls as speaks_tls_at
from counter_server.common.values import phrase
from counter_server.protocol import REPLY_SIZE

from .calls import (
    HTTP_NUDGE,
    PROCESS,
    READ_ATTEMPTS,
    READ_FRAME,
    READ_NOW,
    RECV_BYTES,
    ClientCore,
    ConnectionEnded,
    Deadline,
    NotACounterServer,
    Target,
    decode_call,
    encode_call,
    encode_one,
    nudge_margin,
    outcome,
)
from .errors import CounterError, Unavailable
from .pipeline import Pending, Pipeline, choose


def _connect(where: Target, deadline: Deadline) -> socket.socket:
    """A new connection (TLS handshake done) within the call's ``deadline``;
    Unavailable if there is none."""
    try:
        sock = socket.create_connection((where.host, where.port), timeout=_left(deadline))
    except OSError as exc:
        raise Unavailable(f"cannot connect to {where.address}: {phrase(exc)}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if where.tls is None:
        return sock
    try:
        sock.settimeout(_left(deadline))
        return where.tls.wrap_socket(sock, server_hostname=where.server_hostname)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise Unavailable(f"TLS with {where.address} failed: {phrase(exc)}") from None


def _speaks_tls(where: Target, deadline: Deadline) -> bool:
    """Whether the server completes a TLS handshake (within ``deadline``)."""
    left = deadline.left()
    return left > 0 and speaks_tls_at(where.host, where.port, left)


def _still_open(sock: socket.socket, timeout: float) -> bool:
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
            sock.settimeout(timeout)  # a sender uses it as it is
        return False
    except (OSError, ValueError):
        return False


def _left(deadline: Deadline) -> float:
    """Seconds left for the next socket operation; TimeoutError once none."""
    left = deadline.left()
    if left <= 0:
        raise TimeoutError("no time left")
    return left


def _read_alone(sock: socket.socket, deadline: Deadline) -> int | ConnectionEnded:
    """The counter, read on a connection of its own within ``deadline``; how
    the connection ended if it did first."""
    data = b""
    try:
        sock.settimeout(_left(deadline))
        sock.sendall(READ_FRAME)
        while len(data) < REPLY_SIZE:
            sock.settimeout(_left(deadline))
            chunk = sock.recv(REPLY_SIZE - len(data))
            if not chunk:
                return ConnectionEnded("the server closed the connection", data)
            data += chunk
    except TimeoutError:
        why = "no reply within the timeout"
        return ConnectionEnded(why, data, TimeoutError(why))
    except OSError as exc:
        return ConnectionEnded(f"the connection broke ({phrase(exc)})", data, exc)
    return decode_call(data)[0]


class _Shared:
    """One connection shared by the calls of many threads or greenlets
    (auto-pipelining; see ``client.pipeline``). No thread of its own: a
    caller whose frames are queued and finds nobody sending sends them,
    with those of every call added meanwhile; a waiting caller that finds
    nobody reading reads for all, until its own replies are in, then hands
    reading to the next waiting caller. Its state is guarded by the client's
    lock; the socket is used by at most one sender and one reader at once,
    and with TLS (OpenSSL allows no concurrent read and write on one
    connection) one at a time, through ``io``."""

    __slots__ = ("io", "nudged", "pipeline", "reading", "sending", "sock", "usable")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pipeline = Pipeline()
        self.usable = True  # takes new calls: not ended, nudged, nor a call timed out
        self.reading = False  # a caller reads for all
        self.sending = False  # a caller sends for all
        self.nudged = False  # HTTP_NUDGE went out
        self.io = threading.Lock() if isinstance(sock, ssl.SSLSocket) else None

    def send(self, data: bytes) -> None:
        if self.io is None:
            self.sock.sendall(data)
            return
        with self.io:
            self.sock.sendall(data)

    def recv(self, timeout: float) -> bytes:
        """What arrives within ``timeout`` (TimeoutError if nothing)."""
        sock = self.sock
        if self.io is None:
            sock.settimeout(timeout)
            return sock.recv(RECV_BYTES)
        # TLS: wait outside the lock (pending(): bytes decrypted already),
        # read under it without blocking, so a sender is never held up.
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if not sock.pending() and (left <= 0 or not select.select([sock], [], [], left)[0]):
                raise TimeoutError("no reply within the timeout")
            with self.io:
                sock.setblocking(False)
                try:
                    return sock.recv(RECV_BYTES)
                except (BlockingIOError, ssl.SSLWantReadError):
                    pass  # only part of a record, or TLS housekeeping
                finally:
                    sock.settimeout(timeout)


class _Signal:
    """Wakes one waiting caller (a lock held until released: the cheapest
    wake-up for threads and for greenlets); at most one wake-up pending."""

    __slots__ = ("lock", "pending")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.pending = False

    def wait(self) -> None:
        self.lock.acquire()

    def wake(self) -> None:
        """(Under the client's lock.)"""
        if not self.pending:
            self.pending = True
            self.lock.release()


class CounterClient(ClientCore):
    """A client of one counter server, safe to share between threads and
    greenlets.

    ``address`` is ``HOST:PORT`` (``[::1]:8080`` for IPv6). ``timeout``
    bounds each call, connecting included. Up to ``pool_size`` persistent
    connections, shared by the calls in progress (auto-pipelining): a new
    one is opened only while every open one is busy. TLS: ``tls`` an
    ``ssl.SSLContext``, or ``tls_ca`` (the CA file to verify the server
    with), ``tls_cert`` and ``tls_key`` (a client certificate, for mutual
    TLS). Bad settings raise ``ValueError`` at once; nothing connects until
    the first call.
    """

    def _reset_pool(self) -> None:
        """Start this process's pool: a forked child never touches the
        connections (or a lock held by a thread) of its parent."""
        self._generation = PROCESS.generation
        self._lock = threading.Lock()  # guards the pool and every connection's state
        self._opened = threading.Condition(self._lock)  # a connection was opened (or not)
        self._open: list[_Shared] = []
        self._opening = 0  # connections being opened
        self._signals = threading.local()  # each thread's _Signal

    def increment(self, n: int = 1) -> int:
        """Add ``n`` (0..2^64 - 1) and return the counter right after it.
        Raises ``Unavailable`` (not sent), ``Refused`` (would pass 2^64 - 1;
        not applied) or ``Indeterminate`` (sent, no reply: maybe applied)."""
        return self._call([n], encode_one(n))[0]

    def increment_many(self, increments: Iterable[int]) -> list[int]:
        """Add each increment in order, pipelined in one round trip; the
        counter right after each. On an error, ``exc.replies`` holds the
        replies that came (those increments were applied); of the rest, the
        first is refused or indeterminate as for ``increment``."""
        checked, frames = encode_call(increments)
        return self._call(checked, frames) if checked else []

    def read(self) -> int:
        """The counter's current value (a zero increment). Retried on a new
        connection after a failure; ``Unavailable`` if every attempt fails."""
        failure: CounterError | None = None
        for _ in range(READ_ATTEMPTS):
            try:
                return self._call([0], READ_FRAME)[0]
            except Unavailable as exc:
                failure = exc
                if self._closed:
                    break
            except CounterError as exc:
                failure = exc
        raise Unavailable(f"cannot read the counter: {failure}") from None

    def _call(self, checked: list[int], frames: bytes) -> list[int]:
        if self._generation != PROCESS.generation:
            self._reset_pool()
        frames, floor, deadline = self._begin(checked, frames)
        signal = getattr(self._signals, "signal", None) or self._new_signal()
        call = Pending(frames, deadline, signal)
        connection, sender, reader = self._submit(call, deadline)
        try:
            if sender:
                self._send(connection, call)
            self._wait(connection, call, reader)
        except BaseException:  # gevent.Timeout, an exception injected: replies are dropped
            with self._lock:
                call.abandoned = True
                connection.pipeline.withdraw(call)
            raise
        finally:
            if self._closed or not connection.usable:
                self._settle(connection)
        if call.ended is not None:
            raise self._outcome(call, connection, checked, floor, deadline) from None
        return self._replies(call.data, floor)

    def _new_signal(self) -> _Signal:
        """This thread's (or greenlet's) signal: it waits for one call at a
        time, so one serves all its calls (a stale wake-up only makes a
        waiter look again)."""
        signal = self._signals.signal = _Signal()
        return signal

    def _submit(self, call: Pending, deadline: Deadline) -> tuple[_Shared, bool, bool]:
        """Add ``call`` to the least busy connection, opening one while
        every open one is busy and the pool has room; the connection, and
        whether this caller sends, and reads, for all (nobody else does)."""
        while True:
            with self._lock:
                if self._closed:
                    raise Unavailable(f"the client of {self.address} is closed")
                connection = self._shared()
                if connection is not None:
                    return (connection, *self._add(connection, call))
                if len(self._open) + self._opening >= self._pool_size:
                    if not self._opened.wait(deadline.left()):
                        raise Unavailable(
                            f"no connection to {self.address} opened within the timeout"
                        )
                    continue
                self._opening += 1
            try:
                sock = _connect(self._target, deadline)
            finally:
                with self._lock:
                    self._opening -= 1
                    self._opened.notify_all()
            with self._lock:
                connection = _Shared(sock)
                self._open.append(connection)  # closed after its call if close() ran meanwhile
                if not deadline.left():
                    raise Unavailable(f"{self.address}: timed out before sending")
                return (connection, *self._add(connection, call))

    def _shared(self) -> _Shared | None:
        """(Under the lock.) The connection a new call goes to
        (``pipeline.choose``); None to open another. An idle one the server
        closed meanwhile is dropped."""
        may_open = len(self._open) + self._opening < self._pool_size
        connection = choose(self._open, may_open) if self._open else None
        if connection is None:
            return None
        pipeline = connection.pipeline
        idle = (
            pipeline.frames_added and pipeline.frames_added * REPLY_SIZE == pipeline.bytes_received
        )
        if idle and not _still_open(connection.sock, self._target.timeout):
            connection.usable = False
            self._open.remove(connection)
            connection.sock.close()
            return self._shared()
        return connection

    def _add(self, connection: _Shared, call: Pending) -> tuple[bool, bool]:
        """(Under the lock.) Add ``call``; whether its caller sends, and
        reads, for the connection (nobody else is)."""
        connection.pipeline.add(call)
        sender, reader = not connection.sending, not connection.reading
        connection.sending = connection.reading = True
        return sender, reader

    def _send(self, connection: _Shared, call: Pending | None = None) -> None:
        """Send what the connection's calls want sent until nothing is left
        (the caller set ``sending``). A new ``call`` among others in flight
        first lets the other callers ready to run add theirs, so that their
        frames go out in one write (as an event loop's turn does)."""
        if call is not None and connection.pipeline.load > call.expected // REPLY_SIZE:
            try:
                time.sleep(0)
            except BaseException:  # interrupted: the call is dropped, the others' frames go
                with self._lock:
                    call.abandoned = True
                    connection.pipeline.withdraw(call)
                self._send(connection)
                raise
        while True:
            with self._lock:
                out = connection.pipeline.to_send()
                if not out:
                    connection.sending = False
                    return
            try:
                connection.send(out)
            except BaseException as exc:  # a partial frame would put the connection out of step
                self._end(connection, f"sending failed ({phrase(exc)})", exc)
                with self._lock:
                    connection.sending = False
                if not isinstance(exc, OSError):
                    raise
                return

    def _wait(self, connection: _Shared, call: Pending, reader: bool) -> None:
        """Until ``call`` has its replies or has ended: read for every call
        on the connection while nobody else does (``reader``: this caller
        took that turn), else wait to be woken (by the reader, which also
        ends calls past their deadline)."""
        signal = call.waiter
        while True:
            if reader:
                self._read(connection, call)
            else:
                signal.wait()
            with self._lock:
                if not reader:
                    signal.pending = False  # consumed: the next wake-up releases it again
                if call.complete or call.ended is not None:
                    return
                reader = not connection.reading
                connection.reading = True

    def _read(self, connection: _Shared, call: Pending) -> None:
        """Read for every call on ``connection`` until ``call`` has its
        replies or ends, ending each call whose deadline passes meanwhile;
        then hand reading to the next caller waiting."""
        pipeline = connection.pipeline
        try:
            with self._lock:
                wait, silent = self._still_waiting(connection, call)
            while wait is not None:
                margin = nudge_margin(self._target.timeout) if silent else 0.0
                try:
                    data = connection.recv(max(wait - margin, 0.001))
                    if not data:
                        self._end(connection, "the server closed the connection", None)
                        return
                except TimeoutError:
                    if margin:
                        self._nudge(connection)
                    with self._lock:  # the calls now past their deadline end
                        wait, silent = self._still_waiting(connection, call)
                    continue
                except OSError as exc:
                    self._end(connection, f"the connection broke ({phrase(exc)})", exc)
                    return
                with self._lock:
                    try:
                        done = pipeline.received(data)
                    except NotACounterServer as wrong:
                        done, sender = [], False
                        self._end_locked(connection, str(wrong), wrong)
                    else:
                        sender = bool(pipeline.unsent) and not connection.sending
                        connection.sending = connection.sending or sender
                    for other in done:
                        if other is not call:
                            other.waiter.wake()
                    wait, silent = self._still_waiting(connection, call)
                if sender:
                    self._send(connection)  # the window has room again
        finally:
            with self._lock:
                connection.reading = False
                for other in pipeline.owed:
                    if not other.abandoned:
                        other.waiter.wake()  # reads next
                        break

    def _still_waiting(self, connection: _Shared, call: Pending) -> tuple[float | None, bool]:
        """(Under the lock.) For the reader of ``connection``, whose own call
        is ``call``: end the calls past their deadline; how long to wait for
        replies now (None: ``call`` is over), and whether the connection is
        new and silent (see HTTP_NUDGE)."""
        now = time.monotonic()
        soonest = self._expire_due(connection, now)
        if call.complete or call.ended is not None:
            return None, False
        pipeline = connection.pipeline
        silent = not pipeline.replied and not pipeline.unsent and not connection.nudged
        return soonest - now, silent

    def _expire_due(self, connection: _Shared, now: float) -> float:
        """(Under the lock.) End each call on ``connection`` whose deadline
        has passed (``_expire``), waking its caller; the soonest deadline of
        the calls still waiting (``now`` if none)."""
        soonest = None
        for call in list(connection.pipeline.owed):
            if call.abandoned:
                continue
            if call.deadline.at <= now:
                self._expire(connection, call)
                call.waiter.wake()
            elif soonest is None or call.deadline.at < soonest:
                soonest = call.deadline.at
        return now if soonest is None else soonest

    def _nudge(self, connection: _Shared) -> None:
        """A new connection silent until near the deadline: see HTTP_NUDGE.
        It takes no new call after."""
        with self._lock:
            connection.nudged, connection.usable = True, False
            if connection.sending or connection.pipeline.unsent:
                return  # frames are going out: the nudge would land among them
            connection.sending = True
        try:
            connection.send(HTTP_NUDGE)
        except OSError as exc:
            self._end(connection, f"sending failed ({phrase(exc)})", exc)
        finally:
            with self._lock:
                connection.sending = False

    def _expire(self, connection: _Shared, call: Pending) -> None:
        """(Under the lock.) ``call``'s time ran out: it ends (nothing of it
        is sent afterwards) and the connection takes no new call; its other
        calls go on, and replies to this one are dropped."""
        call.abandoned, connection.usable = True, False
        connection.pipeline.withdraw(call)
        why = "no reply within the timeout"
        call.ended = ConnectionEnded(why, call.data, TimeoutError(why))

    def _end(self, connection: _Shared, why: str, cause: BaseException | None) -> None:
        with self._lock:
            self._end_locked(connection, why, cause)

    def _end_locked(self, connection: _Shared, why: str, cause: BaseException | None) -> None:
        """(Under the lock.) Nothing more will come: every call still owed
        replies ends."""
        connection.usable = False
        for call in connection.pipeline.cut():
            call.ended = ConnectionEnded(why, call.data, cause)
            call.waiter.wake()

    def _settle(self, connection: _Shared) -> None:
        """Close a connection no caller uses any more, once it is unusable
        or the client is closed."""
        with self._lock:
            if connection.pipeline.live or connection.reading or connection.sending:
                return
            connection.usable = False
            if connection in self._open:
                self._open.remove(connection)
        connection.sock.close()

    def _outcome(
        self,
        call: Pending,
        connection: _Shared,
        checked: list[int],
        floor: int | None,
        deadline: Deadline,
    ) -> CounterError:
        """What became of a call that ended early (``calls.outcome``, doing
        the I/O it asks for within ``deadline``); the floor rises to what it
        learned. (A race between threads only keeps the floor lower: still
        true.)"""
        where, answer = self._target, None
        steps = outcome(where, call.sent > 0, not connection.pipeline.replied, call.ended,
                        checked, floor)  # fmt: skip
        while True:
            try:
                ask = steps.send(answer)
            except StopIteration as done:
                error, seen = done.value
                break
            answer = self._value_now(deadline) if ask is READ_NOW else _speaks_tls(where, deadline)
        self._saw(seen)
        return error

    def _value_now(self, deadline: Deadline) -> int | ConnectionEnded | None:
        """After a connection ended early: the counter, read on a new
        connection of its own within what is left of the call's deadline, to
        tell a refusal from an unknown outcome; how that read's connection
        ended if it did, None if none could be opened."""
        try:
            sock = _connect(self._target, deadline)
        except (Unavailable, TimeoutError):
            return None
        with sock:
            return _read_alone(sock, deadline)

    def close(self) -> None:
        """Close every idle connection; calls after it raise ``Unavailable``
        (calls in progress finish, then their connection closes)."""
        with self._lock:
            self._closed = True
            connections = list(self._open)
        for connection in connections:
            self._settle(connection)

    def __enter__(self) -> CounterClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
