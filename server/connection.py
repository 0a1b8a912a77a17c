"""One client connection: the hot path (read, verify, apply, reply), the
timeouts and throttling around it, and the careful close after a refusal.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Protocol

from protocol import MAX_COUNTER, FrameDecoder, InvalidFrame, RejectReason, encode_replies
from server.ratelimit import TokenBucket
from server.stats import ServerStats
from server.store import CounterStore

RECV_SIZE = 64 * 1024
# After refusing a frame we half-close and read what the client still sends
# for a little while, so that closing with unread input (which makes the
# kernel send RST) cannot destroy the replies we owed it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20


class ServerState(Protocol):
    stopping: bool


@dataclass(frozen=True)
class Timeouts:
    """Seconds; None means no limit.

    idle: no bytes at all for this long. frame: a frame whose first byte has
    arrived must be complete within this long (slowloris). write: sending
    replies may block (the client is not reading) for at most this long.
    """

    idle: float | None = 300.0
    frame: float | None = 10.0
    write: float | None = 30.0


DEFAULT_TIMEOUTS = Timeouts()


class ClientTimeout(Exception):
    """The client broke one of the ``Timeouts``; ``reason`` names which."""

    def __init__(self, reason: str, seconds: float) -> None:
        super().__init__(f"{reason.replace('_', ' ')} after {seconds:g}s")
        self.reason = reason


def serve(
    sock: socket.socket,
    store: CounterStore,
    stats: ServerStats,
    state: ServerState,
    timeouts: Timeouts,
    bucket: TokenBucket | None = None,
) -> InvalidFrame | None:
    """Serve frames until the peer closes, a frame is refused or shutdown begins.

    Every complete valid frame of a read is applied in order and all their
    replies go out in one write. Returns the refusal (checksum or overflow;
    truncated if the peer closed mid-frame), or None. Raises ClientTimeout;
    OSError from the socket (reset, broken pipe) propagates, except when
    shutdown cut the read side.
    """
    decoder = FrameDecoder()
    feed = decoder.feed
    apply = store.apply
    recv = sock.recv
    send = sock.send
    settimeout = sock.settimeout
    idle, frame_limit, write_limit = timeouts.idle, timeouts.frame, timeouts.write
    read_size = RECV_SIZE
    read_timeout = idle
    frame_deadline = 0.0
    settimeout(read_timeout)
    while not state.stopping:
        # Around the hot path: throttling and the timeout of the next read.
        if bucket is not None:
            read_size = bucket.read_budget(decoder.pending_bytes)
        timeout = idle
        if frame_limit is not None and decoder.pending_bytes:
            timeout = frame_deadline - time.monotonic()
            if timeout <= 0:
                raise ClientTimeout("frame_timeout", frame_limit)
            if idle is not None and idle < timeout:
                timeout = idle
        if timeout != read_timeout:
            read_timeout = timeout
            settimeout(timeout)

        # The hot path: read, verify, apply, reply.
        try:
            chunk = recv(read_size)
        except TimeoutError:
            partial = frame_limit is not None and decoder.pending_bytes and timeout != idle
            reason = "frame_timeout" if partial else "idle_timeout"
            raise ClientTimeout(reason, frame_limit if partial else idle) from None
        except OSError:
            if state.stopping:
                return None
            raise
        if not chunk:
            return None if state.stopping else decoder.close()
        stats.bytes_in += len(chunk)
        started_frame = decoder.pending_bytes
        increments = feed(chunk)
        if increments:
            replies = apply(increments)
            if replies:
                out = encode_replies(replies)
                if write_limit != read_timeout:
                    settimeout(write_limit)
                    read_timeout = write_limit
                try:
                    sent = send(out)
                    if sent != len(out):  # rare: the socket buffer is full
                        sock.sendall(memoryview(out)[sent:])
                except TimeoutError:
                    raise ClientTimeout("write_timeout", write_limit) from None
                stats.bytes_out += len(out)
                stats.replies_per_write[len(replies).bit_length()] += 1
                if bucket is not None:
                    bucket.spend(len(replies))
            if len(replies) < len(increments):
                return _overflow(increments[len(replies)], store.value)
        if decoder.error is not None:
            return decoder.error
        if frame_limit is not None and decoder.pending_bytes and (increments or not started_frame):
            frame_deadline = time.monotonic() + frame_limit  # a new frame has begun
    return None


def _overflow(increment: int, value: int) -> InvalidFrame:
    return InvalidFrame(
        RejectReason.OVERFLOW,
        f"increment {increment} would take the counter ({value}) past {MAX_COUNTER}",
    )


def stop_reading(sock: socket.socket) -> None:
    """Shut the read side of ``sock`` so a greenlet waiting in recv wakes with
    end-of-stream, while replies can still be written. Works under TLS too:
    the shutdown goes to the kernel socket through a duplicate descriptor."""
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as duplicate:
            duplicate.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def close_after_refusal(sock: socket.socket) -> None:
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
