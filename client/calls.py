"""What the client library's two front ends (``CounterClient``, threads and
greenlets; ``AsyncCounterClient``, asyncio) share, with no I/O: checking the
arguments, encoding a call, decoding its replies, and saying what became of a
call whose connection ended early.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from functools import cached_property

from counter_server.common.tls import client_context
from counter_server.common.values import format_address, host_port
from counter_server.protocol import MAX_COUNTER, REPLY_SIZE, decode_replies, encode_request

from .errors import CounterError, Indeterminate, Refused, Unavailable

DEFAULT_TIMEOUT = 5.0  # seconds for a connect, a TLS handshake, or a call's replies
DEFAULT_POOL_SIZE = 4  # persistent connections per client
READ_ATTEMPTS = 3  # a read() is tried this many times, each on a fresh connection after a failure
READ_FRAME = encode_request(0)
# Frames a call keeps unanswered on its connection: a batch of any size
# streams in pieces, and the replies owed (8 KiB) always fit in the socket
# buffers, so the server never stops reading for replies the client has not
# read yet while the client is still sending.
IN_FLIGHT_FRAMES = 1024
# Frames in flight on a connection before a call goes to another one: calls
# are packed onto few connections, so that more of them travel in each write
# and each read (bench/library.py, 40 callers in one process: 2 connections
# of about 20 calls beat 4 of 10 by 10-20%, and 1 of 40 leaves the client
# idle while the server answers), and a large batch has a connection to itself.
SHARE_DEPTH = 32
RECV_BYTES = 65536  # at most one read's worth of replies (8,192), not a buffer the size of a batch


class _Process:
    """Which process this is, as a number that changes in a forked child
    (cheaper to compare on each call than ``os.getpid()``, a system call)."""

    generation = 0

    @classmethod
    def forked(cls) -> None:
        cls.generation += 1


PROCESS = _Process
os.register_at_fork(after_in_child=_Process.forked)


class ConnectionEnded(Exception):
    """A call's connection ended (closed, reset, timed out) before every
    reply came: ``why``, the bytes that did arrive, and what ended it (a
    socket or TLS error, ``TimeoutError``, ``NotACounterServer``; None: the
    server closed it)."""

    def __init__(self, why: str, data: bytes, cause: BaseException | None = None) -> None:
        super().__init__(why)
        self.why, self.data, self.cause = why, data, cause


# TLS alerts by which a server refuses the client's side of the handshake:
# it read no frame from that connection.
REFUSED_CERTIFICATE = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate "
    "(pass tls_cert= and tls_key=)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says the client certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server says the client certificate was revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server refused the client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the CA of the client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the server refused the client certificate",
}


def not_sent(address: str, ended: ConnectionEnded) -> Unavailable:
    """What a call is told whose frames never went out: its time ran out
    while they waited their turn, or the connection ended first."""
    if isinstance(ended.cause, TimeoutError):
        why = "the call's time ran out before its frames were sent"
    else:
        why = f"{ended.why} before the call's frames were sent"
    return Unavailable(f"{address}: {why}; nothing was applied")


def not_served(address: str, fresh: bool, ended: ConnectionEnded) -> Unavailable | None:
    """``Unavailable`` when the server is not serving the call at all: it
    answered in HTTP, or (the first call on a new connection, nothing back)
    refused the client's TLS certificate or the lack of one. Either way it
    applied no frame. None otherwise."""
    if isinstance(ended.cause, NotACounterServer):
        hint = (
            " in HTTP (is this the metrics port?)"
            if ended.cause.http
            else " bytes it was not asked for"
        )
        return Unavailable(
            f"{address} is not a counter server: it answered{hint}; nothing was applied"
        )
    if not fresh or ended.data or not isinstance(ended.cause, ssl.SSLError):
        return None
    refusal = REFUSED_CERTIFICATE.get(getattr(ended.cause, "reason", None) or "")
    if refusal is None:
        return None
    return Unavailable(f"{address}: {refusal} ({ended.cause.reason}); nothing was applied")


class NotACounterServer(Exception):
    """What ended a call whose server sent what no counter server sends (a
    ``cause``): ``http`` if it answered in HTTP."""

    def __init__(self, http: bool) -> None:
        super().__init__("answered in HTTP" if http else "sent more than was asked for")
        self.http = http


# Sent on a new connection whose first reply has not come when only this
# much of the call's time is left (at most a quarter of it): it ends the
# request line an HTTP server (the metrics port) is still waiting for, so
# that it answers and can be named. To a slow counter server it is the start
# of a frame; such a connection is closed after its call, never reused.
HTTP_NUDGE = b"\r\n"
NUDGE_BEFORE_DEADLINE = 0.25  # seconds


def nudge_margin(timeout: float) -> float:
    """How long before a call's deadline a silent new connection is nudged."""
    return min(NUDGE_BEFORE_DEADLINE, timeout / 4)


def foreign(data: bytes, expected: int) -> NotACounterServer | None:
    """The bytes a new connection got back, if no counter server could have
    sent them: more than ``expected`` (a counter server sends one reply per
    frame, nothing else), or an HTTP status line (``HTTP/1.1 400``, which as
    replies would be a value followed by a smaller one)."""
    status_line = len(data) >= 9 and data[:7] == b"HTTP/1." and data[8:9] == b" "
    if not status_line and len(data) <= expected:
        return None
    http = status_line or data.lstrip()[:1] == b"<"  # HTTP/0.9: the page alone
    return NotACounterServer(http)


def speaks_tls(address: str) -> Unavailable:
    """What a plain client is told when the server turned out to want TLS."""
    return Unavailable(
        f"{address} looks like a TLS server: pass tls_ca= (the CA file that signed its "
        "certificate), or tls= an SSLContext; nothing was applied"
    )


def may_want_tls(where: Target, fresh: bool, ended: ConnectionEnded) -> bool:
    """Whether a plain client's first call on a new connection ended the way
    a TLS server ends one (closed or reset at once, nothing answered), so
    that a TLS handshake is worth trying to name the cause."""
    timed_out = isinstance(ended.cause, TimeoutError)
    return where.tls is None and fresh and not ended.data and not timed_out


@dataclass(frozen=True)
class Target:
    """Where and how to connect."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    server_hostname: str | None
    timeout: float

    @cached_property  # read on every call
    def address(self) -> str:
        return format_address((self.host, self.port))


def target(
    address: str,
    timeout: float,
    tls: ssl.SSLContext | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    server_hostname: str | None,
) -> Target:
    """The checked settings of a client; ValueError if any is unusable."""
    host, port = host_port(address)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if tls is None and (tls_ca or tls_cert or tls_key):
        tls = client_context(tls_ca, tls_cert, tls_key or tls_cert)
    elif tls is not None and (tls_ca or tls_cert or tls_key):
        raise ValueError("give tls= (an SSLContext) or tls_ca=/tls_cert=/tls_key=, not both")
    return Target(host, port, tls, server_hostname or host if tls else None, timeout)


def check_pool_size(pool_size: int) -> int:
    if not isinstance(pool_size, int) or pool_size < 1:
        raise ValueError(f"pool_size must be a whole number >= 1, got {pool_size!r}")
    return pool_size


class ClientCore:
    """What both front ends keep and do alike, without I/O: the checked
    settings, the pool's size, whether the client is closed, and the floor
    (the highest value seen: the counter is at least that). Each front end
    starts its own pool in ``_reset_pool``."""

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
        self._floor: int | None = None
        self._reset_pool()

    def _reset_pool(self) -> None:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return self._target.address

    def _begin(self, checked: list[int], frames: bytes) -> tuple[bytes, int | None, Deadline]:
        """A new call: what it sends (``outgoing``), the floor it starts
        from, and its deadline."""
        floor = self._floor
        return outgoing(self.address, floor, checked, frames), floor, Deadline(self._target.timeout)

    def _replies(self, data: bytes, floor: int | None) -> list[int]:
        """A call's own replies, from what arrived; the floor rises to the last."""
        _, replies = split_probe(decode_call(data), floor)
        self._saw(replies[-1])
        return replies

    def _saw(self, value: int | None) -> None:
        """The counter was ``value`` (if known): the floor rises to it. (A
        race between threads only keeps the floor lower: still true.)"""
        if value is not None and (self._floor is None or value > self._floor):
            self._floor = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


_COMMON_FRAMES = {n: encode_request(n) for n in range(2)}  # reads and increments of 1


def encode_call(increments: Iterable[int]) -> tuple[list[int], bytes]:
    """The checked increments and their frames; ValueError (nothing sent)
    for an increment that is not a whole number in 0..2^64 - 1."""
    checked = list(increments)
    frames = []
    for n in checked:
        if isinstance(n, bool) or not isinstance(n, int):  # bool is an int, not an increment
            raise ValueError(f"an increment must be an int, got {n!r}")
        if not 0 <= n <= MAX_COUNTER:
            raise ValueError(f"an increment must be between 0 and 2^64 - 1, got {n}")
        frames.append(_COMMON_FRAMES.get(n) or encode_request(n))
    return checked, b"".join(frames)


def encode_one(n: int) -> bytes:
    """The frame of one increment (as ``encode_call``)."""
    frame = _COMMON_FRAMES.get(n) if type(n) is int else None
    return frame or encode_call([n])[1]


def decode_call(data: bytes) -> list[int]:
    """The whole replies in ``data``."""
    if len(data) == REPLY_SIZE:
        return [int.from_bytes(data, "big")]
    return list(decode_replies(data[: len(data) - len(data) % REPLY_SIZE]))


class Deadline:
    """A call's time budget: ``timeout`` seconds from its start, renewed
    whenever replies arrive, so that a call ends within ``timeout`` of its
    last progress (a single increment within ``timeout`` in all, a large
    batch as long as replies keep coming)."""

    __slots__ = ("at", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout  # when it is spent (time.monotonic)

    def left(self) -> float:
        """Seconds left; 0.0 once the budget is spent."""
        return max(self.at - time.monotonic(), 0.0)

    def progressed(self) -> None:
        self.at = time.monotonic() + self.timeout


def outgoing(address: str, floor: int | None, checked: list[int], frames: bytes) -> bytes:
    """What a call sends: its frames, after a read frame when the client has
    seen no value yet (``floor`` None), so that a refusal of its first
    increment can be proven (see ``ended_early``). Raises ``Refused``,
    sending nothing, when the first increment cannot fit."""
    if floor is None:
        return READ_FRAME + frames
    if floor + checked[0] > MAX_COUNTER:
        raise refused_locally(address, floor, checked[0])
    return frames


def split_probe(values: list[int], floor: int | None) -> tuple[int | None, list[int]]:
    """The floor (learned by the probe, if it was sent and answered) and the
    call's own replies, from what arrived."""
    if floor is not None or not values:
        return floor, values
    return values[0], values[1:]


def refused_locally(address: str, floor: int | None, n: int) -> Refused | None:
    """``Refused`` for an increment that cannot fit: the counter is at least
    ``floor`` (the highest value this client has seen) and never goes down,
    so the server would refuse ``n``; None otherwise."""
    if floor is None or floor + n <= MAX_COUNTER:
        return None
    return Refused(
        f"{address}: the increment {n} would take the counter past 2^64 - 1 (it is at "
        f"least {floor}); refused without sending it, the counter did not move",
        value=floor,
    )


def can_classify(increments: list[int], replies: list[int]) -> bool:
    """Whether reading the counter after a call ended early could prove that
    its first unanswered increment was not applied (a read never can)."""
    return increments[len(replies)] != 0


def ended_early(
    address: str,
    increments: list[int],
    replies: list[int],
    floor: int | None,
    value_now: int | None,
    why: str,
) -> CounterError:
    """What became of a call whose connection ended (closed, reset, timed
    out) after ``len(replies)`` replies; ``floor`` is the highest value the
    client had seen before sending, ``value_now`` the counter read afterwards
    on a fresh connection (None if that failed).

    Only what can be proven is claimed. The counter never goes down, so when
    the first unanswered increment ``n`` was processed the counter was at
    least ``lower`` (``floor``, or the reply just before it). ``Refused`` if
    ``lower + n`` passes 2^64 - 1 (the server cannot have applied it), or if
    ``value_now + n`` does while ``value_now < lower + n`` (not applied by
    the time of the read, and it can never fit after). Anything else may
    have been applied: ``Indeterminate``, whose ``value`` is ``value_now``."""
    pending = increments[len(replies)]
    lower = replies[-1] if replies else floor or 0
    certain = lower + pending > MAX_COUNTER
    if certain or (
        value_now is not None and value_now + pending > MAX_COUNTER and value_now < lower + pending
    ):
        value = value_now if value_now is not None else lower
        return Refused(
            f"{address} refused the increment {pending}: the counter (at least {value}) "
            f"would pass 2^64 - 1; the counter did not move",
            replies=replies,
            value=value,
        )
    unanswered = len(increments) - len(replies)
    frames = "1 frame" if unanswered == 1 else f"{unanswered} frames"
    return Indeterminate(
        f"{address}: {why} with {frames} unanswered: the increment may or may not "
        "have been applied (not retried)",
        replies=replies,
        value=value_now,
    )


# What ``outcome`` asks its front end to do before it can judge a call.
READ_NOW = "read the counter on a new connection"  # send back int, ConnectionEnded or None
TLS_PROBE = "try an unverified TLS handshake"  # send back whether the server completed it

Verdict = Generator[str, object, tuple[CounterError, int | None]]


def outcome(
    where: Target,
    sent: bool,
    fresh: bool,
    ended: ConnectionEnded,
    checked: list[int],
    floor: int | None,
) -> Verdict:
    """What became of a call whose connection ended, or whose time ran out,
    before every reply came, for both front ends (no I/O: it yields
    ``READ_NOW`` or ``TLS_PROBE`` for the front end to do and send back the
    answer). ``sent``: some of its frames went out; ``fresh``: its connection
    had no reply yet. Returns the error and the highest value it learned the
    counter had (the floor may rise to it; None: nothing learned).

    Nothing sent, or a server that refused our TLS side or is not a counter
    server: ``Unavailable``. Otherwise the counter is read (within what is
    left of the call's time) and ``ended_early`` judges; when the call and
    that read were both cut at once with nothing back, a plain client tries
    a TLS handshake to name a TLS server."""
    if not sent:
        return not_sent(where.address, ended), None
    unserved = not_served(where.address, fresh, ended)
    if unserved is not None:
        return unserved, None
    floor, replies = split_probe(decode_call(ended.data), floor)
    now = (yield READ_NOW) if can_classify(checked, replies) else None
    if isinstance(now, ConnectionEnded):
        # Both cut at once, the read too: a TLS server, or a server
        # refusing us before reading any frame (never a probe's victim).
        cut = may_want_tls(where, fresh, ended) and may_want_tls(where, True, now)
        if cut and (yield TLS_PROBE):
            return speaks_tls(where.address), None
        now = None
    known = [v for v in (now, *replies[-1:], floor) if v is not None]
    error = ended_early(where.address, checked, replies, floor, now, ended.why)
    return error, max(known, default=None)
