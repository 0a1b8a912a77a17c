"""What the client library's two front ends (``CounterClient``, threads and
greenlets; ``AsyncCounterClient``, asyncio) share, with no I/O: checking the
arguments, encoding a call, decoding its replies, and saying what became of a
call whose connection ended early.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass

from counter_server.common.tls import client_context
from counter_server.common.values import host_port
from counter_server.protocol import MAX_COUNTER, REPLY_SIZE, decode_replies, encode_request

from .errors import CounterError, Indeterminate, Refused

DEFAULT_TIMEOUT = 5.0  # seconds for a connect, a TLS handshake, or a call's replies
DEFAULT_POOL_SIZE = 4  # persistent connections per client
READ_ATTEMPTS = 3  # a read() is tried this many times, each on a fresh connection after a failure
READ_FRAME = encode_request(0)
# Frames a call keeps unanswered on its connection: a batch of any size
# streams in pieces, and the replies owed (8 KiB) always fit in the socket
# buffers, so the server never stops reading for replies the client has not
# read yet while the client is still sending.
IN_FLIGHT_FRAMES = 1024


class ConnectionEnded(Exception):
    """A call's connection ended (closed, reset, timed out) before every
    reply came: ``why``, and the bytes that did arrive."""

    def __init__(self, why: str, data: bytes) -> None:
        super().__init__(why)
        self.why, self.data = why, data


def reason(exc: BaseException) -> str:
    """A socket or TLS failure as a short phrase."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


@dataclass(frozen=True)
class Target:
    """Where and how to connect."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    server_hostname: str | None
    timeout: float

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


def decode_call(data: bytes) -> list[int]:
    """The whole replies in ``data``."""
    return list(decode_replies(data[: len(data) - len(data) % REPLY_SIZE]))


class Deadline:
    """A call's time budget: ``timeout`` seconds from its start, renewed
    whenever replies arrive, so that a call ends within ``timeout`` of its
    last progress (a single increment within ``timeout`` in all, a large
    batch as long as replies keep coming)."""

    __slots__ = ("_at", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._at = time.monotonic() + timeout

    def left(self) -> float:
        """Seconds left; 0.0 once the budget is spent."""
        return max(self._at - time.monotonic(), 0.0)

    def progressed(self) -> None:
        self._at = time.monotonic() + self.timeout


def outgoing(address: str, floor: int | None, checked: list[int], frames: bytes) -> bytes:
    """What a call sends: its frames, after a read frame when the client has
    seen no value yet (``floor`` None), so that a refusal of its first
    increment can be proven (see ``ended_early``). Raises ``Refused``,
    sending nothing, when the first increment cannot fit."""
    refusal = refused_locally(address, floor, checked[0])
    if refusal is not None:
        raise refusal
    return frames if floor is not None else READ_FRAME + frames


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
