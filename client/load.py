"""Load generation: many persistent connections, each keeping a number of
frames in flight, every reply checked; per-connection results for the live
progress line and the final report.

Depends only on the protocol (docs/protocol.md), so it drives any server that speaks the protocol
(the Go original included).
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import gevent
from gevent.event import Event
from gevent.pool import Pool

from counter_server.common.sockets import reader, shut_down
from counter_server.common.tls import speaks_tls
from counter_server.common.values import phrase, plural
from counter_server.protocol import REPLY_SIZE, encode_request

RECV_SIZE = 64 * 1024

# Error kinds, as counted and reported.
REFUSED = "refused"  # connection refused or unreachable
TLS_ALERT = b"\x15\x03"  # the first bytes of a TLS alert record
TLS_HANDSHAKE = b"\x16\x03"  # ... and of a TLS handshake record
CLOSED = "closed"  # the server closed or reset the connection with replies owed
SHORT_REPLY = "short_reply"  # the connection ended partway through a reply
NOT_INCREASING = "not_increasing"  # a reply not above the previous one (value > 0)
TIMEOUT = "timeout"  # no reply, or no connection, within the timeout
EXTRA_REPLY = "extra_reply"  # more replies than frames sent
TLS = "tls"  # the TLS handshake failed (certificate refused, not a TLS server)
ERROR_KINDS = (REFUSED, CLOSED, SHORT_REPLY, NOT_INCREASING, TIMEOUT, EXTRA_REPLY, TLS)


@dataclass
class ConnectionResult:
    """What one connection did."""

    sent: int = 0
    acknowledged: int = 0
    last_value: int | None = None
    errors: Counter = field(default_factory=Counter)
    error_detail: str = ""
    latency_us: Counter = field(default_factory=Counter)  # microseconds -> replies
    timed_out: bool = False  # set by the reply watchdog


@dataclass
class LoadSettings:
    host: str
    port: int
    connections: int
    duration: float
    pipeline: int = 1
    increment: int = 1
    timeout: float = 10.0
    tls: ssl.SSLContext | None = None


class LoadRun:
    """Connects every connection first, starts them together, stops sending
    at the deadline and collects the replies still owed."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self._speaks_tls: bool | None = None  # asked once, when a plain connection is cut
        self.results = [ConnectionResult() for _ in range(settings.connections)]
        self.started_at = 0.0  # perf_counter() when the connections started sending
        self.started_wall = 0.0  # the same moment as Unix time, for reports
        self.elapsed = 0.0
        self.interrupted = False
        self._go = Event()
        self._stopping = False

    def run(self) -> list[ConnectionResult]:
        """Run the whole load (blocks for about ``duration`` seconds)."""
        pool = Pool(self.settings.connections)
        sockets = list(pool.imap(self._connect, self.results))
        self.started_at = time.perf_counter()
        self.started_wall = time.time()
        stopper = gevent.spawn_later(self.settings.duration, self.stop)
        live = [(s, r) for s, r in zip(sockets, self.results, strict=True) if s is not None]
        watchdog = gevent.spawn(self._watch_replies, live)
        for sock, result in live:
            pool.spawn(self._drive, sock, result)
        self._go.set()
        pool.join()
        stopper.kill()
        watchdog.kill()
        self.elapsed = time.perf_counter() - self.started_at
        return self.results

    @property
    def acknowledged(self) -> int:
        """Replies received so far, all connections together."""
        return sum(r.acknowledged for r in self.results)

    @property
    def errors(self) -> int:
        """Errors counted so far, all connections together."""
        return sum(sum(r.errors.values()) for r in self.results)

    def stop(self) -> None:
        """Stop sending new frames; connections finish collecting owed replies."""
        self._stopping = True

    def interrupt(self) -> None:
        """Stop before the deadline (a signal): like ``stop``, and say so in the report."""
        self.interrupted = True
        self.stop()

    def _watch_replies(self, live: list[tuple[socket.socket, ConnectionResult]]) -> None:
        """Enforce the reply timeout from outside the connections: a
        connection owed replies that received none for ``timeout`` seconds is
        marked timed out and shut down, which wakes its blocked recv or send.
        (A timeout on each socket would start a timer for every wait.)"""
        timeout = self.settings.timeout
        interval = min(timeout / 4, 0.25)
        seen = {id(result): (result.acknowledged, time.monotonic()) for _, result in live}
        while True:
            gevent.sleep(interval)
            now = time.monotonic()
            for sock, result in live:
                acknowledged, since = seen[id(result)]
                if result.acknowledged != acknowledged or result.sent == acknowledged:
                    seen[id(result)] = (result.acknowledged, now)
                elif now - since >= timeout and not result.timed_out:
                    result.timed_out = True
                    shut_down(sock, socket.SHUT_RDWR)

    def _connect(self, result: ConnectionResult) -> socket.socket | None:
        settings = self.settings
        try:
            sock = open_connection(settings.host, settings.port, settings.timeout, settings.tls)
            sock.settimeout(None)  # replies are timed by _watch_replies
            return sock
        except ssl.SSLError as exc:
            self._fail(result, TLS, f"TLS handshake: {phrase(exc)}")
        except TimeoutError as exc:
            self._fail(result, TIMEOUT, f"connect: {phrase(exc)}")
        except OSError as exc:
            kind = TLS if settings.tls is not None and exc.errno is None else REFUSED
            self._fail(result, kind, f"connect: {phrase(exc)}")
        return None

    def _fail(self, result: ConnectionResult, kind: str, detail: str, count: int = 1) -> None:
        result.errors[kind] += count
        result.error_detail = result.error_detail or detail

    def _drive(self, sock: socket.socket, result: ConnectionResult) -> None:
        try:
            self._go.wait()
            self._exchange(sock, result)
        except OSError as exc:
            owed = max(1, result.sent - result.acknowledged)
            if result.timed_out or isinstance(exc, TimeoutError):
                self._fail(result, TIMEOUT, f"no reply within {self.settings.timeout}s", owed)
            elif isinstance(exc, ssl.SSLError):
                # Under TLS 1.3 a server refusing our certificate says so
                # only after the handshake, at the first read or write.
                self._fail(result, TLS, f"TLS: {phrase(exc)}", owed)
            else:
                detail = f"connection lost: {phrase(exc)}{self._tls_hint(result)}"
                self._fail(result, CLOSED, detail, owed)
        finally:
            sock.close()

    def _tls_hint(self, result: ConnectionResult, received: bytes = b"") -> str:
        """A hint to add --tls only where TLS is the cause: a plain connection
        that got TLS bytes, or was cut before any reply by a server that does
        not answer a plain read but completes a TLS handshake (asked once per
        run; the read first, so that a counter server never takes a
        ClientHello for frames)."""
        if self.settings.tls is not None:
            return ""
        if received[:2] in (TLS_ALERT, TLS_HANDSHAKE):
            return " (the server answered in TLS: add --tls)"
        if result.acknowledged or received:
            return ""
        if self._speaks_tls is None:
            host, port, timeout = self.settings.host, self.settings.port, self.settings.timeout
            try:
                read_counter(host, port, timeout)
                self._speaks_tls = False
            except OSError:
                self._speaks_tls = speaks_tls(host, port, timeout)
        return " (the server speaks TLS: add --tls)" if self._speaks_tls else ""

    def _closed_detail(self, result: ConnectionResult, owed: int, received: bytes) -> str:
        """What is known when the server closed a connection with replies owed."""
        replies = plural(result.acknowledged, "reply", "replies")
        detail = (
            f"the server closed the connection after {replies}, "
            f"with {plural(owed, 'reply', 'replies')} owed"
        )
        if received.startswith(b"HTTP/"):
            return f"{detail} (it answered in HTTP: is this the metrics port?)"
        hint = self._tls_hint(result, received=received)
        return detail + (hint or "; check the server's log for the reason")

    def _exchange(self, sock: socket.socket, result: ConnectionResult) -> None:
        settings = self.settings
        frame = encode_request(settings.increment)
        must_increase = settings.increment > 0
        latency = result.latency_us
        in_flight: deque[list] = deque()  # [send time, frames] per write, oldest first
        pending = b""
        last = -1
        send = sock.send
        recv = reader(sock)

        now = time.perf_counter()
        # Counted as sent before the write, so that the watchdog times a
        # write the server never reads.
        owed = result.sent = settings.pipeline
        in_flight.append([now, owed])
        sock.sendall(frame * owed)
        while owed:
            chunk = recv(RECV_SIZE)
            if not chunk:
                if result.timed_out:  # the watchdog shut the socket down
                    raise TimeoutError
                kind = SHORT_REPLY if pending else CLOSED
                self._fail(result, kind, self._closed_detail(result, owed, pending), owed)
                return
            now = time.perf_counter()
            data = pending + chunk if pending else chunk
            count = len(data) // REPLY_SIZE
            pending = data[count * REPLY_SIZE :]
            if not count:
                continue
            if last < 0 and data.startswith(b"HTTP/"):
                detail = "the server answered in HTTP: is this the metrics port?"
                self._fail(result, CLOSED, detail, owed)
                return
            if count > owed:
                extra = plural(count - owed, "reply", "replies")
                self._fail(result, EXTRA_REPLY, f"{extra} for frames never sent")
                return
            values = struct.unpack_from(f">{count}Q", data)
            if must_increase:
                if values[0] <= last or (count > 1 and list(values) != sorted(set(values))):
                    self._count_not_increasing(result, last, values)
            elif values[0] < last or (count > 1 and list(values) != sorted(values)):
                self._count_not_increasing(result, last, values)
            last = values[-1]
            result.last_value = last
            result.acknowledged += count
            owed -= count
            _record_latencies(latency, in_flight, count, now)
            if not self._stopping:
                owed += count
                result.sent += count
                in_flight.append([now, count])
                out = frame * count if count > 1 else frame
                sent = send(out)
                if sent != len(out):
                    sock.sendall(out[sent:])

    def _count_not_increasing(
        self, result: ConnectionResult, last: int, values: tuple[int, ...]
    ) -> None:
        strict = self.settings.increment > 0
        previous, bad = last, 0
        for value in values:
            if value < previous or (strict and value == previous):
                bad += 1
            previous = value
        self._fail(result, NOT_INCREASING, f"reply {values} did not rise above {last}", bad)


def _record_latencies(latency: Counter, in_flight: deque, count: int, now: float) -> None:
    """Charge ``count`` replies received at ``now`` to the oldest writes in flight."""
    while count:
        batch = in_flight[0]
        taken = min(count, batch[1])
        latency[int((now - batch[0]) * 1_000_000)] += taken
        batch[1] -= taken
        count -= taken
        if not batch[1]:
            in_flight.popleft()


def open_connection(
    host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None
) -> socket.socket:
    """A connected socket with Nagle off, TLS-wrapped (handshake done) if
    ``tls`` is given. OSError (ssl.SSLError included) if that fails."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def read_counter(
    host: str, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None
) -> int:
    """The server's current counter value (sends a zero increment)."""
    with open_connection(host, port, timeout, tls) as sock:
        sock.sendall(encode_request(0))
        return struct.unpack(">Q", recv_exactly(sock, REPLY_SIZE))[0]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes; ConnectionError if the server closes first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection without replying")
        data += chunk
    return data
