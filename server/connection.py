"""One client connection: the hot path (read, verify, apply, reply) and the
careful close that follows a refused frame.

Timeouts are enforced from outside by ``server.timeouts.TimeoutReaper``; the
loop only keeps the counters it reads and raises its verdict (ClientTimeout).
"""

from __future__ import annotations

import socket
import time
from typing import Protocol

from protocol import MAX_COUNTER, FrameDecoder, InvalidFrame, RejectReason, encode_replies
from server.ratelimit import TokenBucket
from server.stats import ServerStats
from server.store import CounterStore
from server.timeouts import TimeoutReaper, Watched

RECV_SIZE = 64 * 1024
# After refusing a frame we half-close and read what the client still sends
# for a little while, so that closing with unread input (which makes the
# kernel send RST) cannot destroy the replies we owed it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20


class ServerState(Protocol):
    stopping: bool


def serve(
    sock: socket.socket,
    store: CounterStore,
    stats: ServerStats,
    state: ServerState,
    reaper: TimeoutReaper,
    bucket: TokenBucket | None = None,
) -> InvalidFrame | None:
    """Serve frames until the peer closes, a frame is refused or shutdown begins.

    Every complete valid frame of a read is applied in order and all their
    replies go out in one write. Returns the refusal (checksum or overflow;
    truncated if the peer closed mid-frame), or None. Raises ClientTimeout when
    the reaper timed the connection out; OSError from the socket (reset,
    broken pipe) propagates, except when shutdown cut the read side.
    """
    decoder = FrameDecoder()
    watched = reaper.watch(sock, decoder)
    try:
        return _serve(sock, decoder, watched, store, stats, state, bucket)
    except OSError:
        # The reaper or shutdown cut the socket under a blocked send.
        if watched.timed_out is not None:
            raise watched.timed_out from None
        if state.stopping:
            return None
        raise
    finally:
        reaper.forget(watched)
        stats.bytes_in += watched.bytes_in
        stats.bytes_out += watched.bytes_out


def _serve(
    sock: socket.socket,
    decoder: FrameDecoder,
    watched: Watched,
    store: CounterStore,
    stats: ServerStats,
    state: ServerState,
    bucket: TokenBucket | None,
) -> InvalidFrame | None:
    """The hot loop. Blocking steps: ``recv`` (the reaper watches bytes_in),
    ``watched.write`` and ``watched.wait_for_tokens`` (which flag themselves)."""
    # Bound methods in locals: one attribute lookup per connection instead of
    # one per request.
    feed = decoder.feed
    apply = store.apply
    recv = sock.recv
    write = watched.write
    writes_by_size = stats.replies_per_write
    read_size = RECV_SIZE
    while not state.stopping:
        if bucket is not None:  # over its rate: stop reading until tokens refill
            read_size = watched.wait_for_tokens(bucket)

        chunk = recv(read_size)
        if not chunk:
            if watched.timed_out is not None:
                raise watched.timed_out
            return None if state.stopping else decoder.close()
        watched.bytes_in += len(chunk)
        increments = feed(chunk)
        if increments:
            replies = apply(increments)
            if replies:
                write(encode_replies(replies))
                writes_by_size[len(replies).bit_length()] += 1
                if bucket is not None:
                    bucket.spend(len(replies))
            if len(replies) < len(increments):
                return _overflow(increments[len(replies)], store.value)
        if decoder.error is not None:
            return decoder.error
    return None


def _overflow(increment: int, value: int) -> InvalidFrame:
    return InvalidFrame(
        RejectReason.OVERFLOW,
        f"increment {increment} would take the counter ({value}) past {MAX_COUNTER}",
    )


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
