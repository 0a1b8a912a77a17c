"""Incremental request decoder: byte chunks of any size in, valid increments out.

Framing never depends on how TCP cut the stream (docs/protocol.md, rule 1): bytes are
buffered until a whole 16-byte frame is present. Decoding stops for good at
the first frame whose checksum does not match; ``error`` then says why.

The common case, a chunk holding many identical frames (a pipelining client
sending increments of 1), is recognised with one C-level ``bytes.count`` and
verified once. Otherwise the chunk is unpacked in one call and each *distinct*
(increment, checksum) pair is hashed once.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from counter_server.protocol.frames import (
    FRAME_SIZE,
    FRAME_STRUCT,
    InvalidFrame,
    RejectReason,
    checksum,
    checksum_mismatch,
)

# increment -> its checksum, for increments seen recently. Pure memoisation of
# checksum(); bounded so a client sending many distinct values cannot grow it.
_known_checksums: dict[int, int] = {}
_KNOWN_CHECKSUMS_MAX = 4096


def _is_valid(increment: int, received: int) -> bool:
    expected = _known_checksums.get(increment)
    if expected is None:
        expected = checksum(increment)
        if len(_known_checksums) >= _KNOWN_CHECKSUMS_MAX:
            _known_checksums.clear()
        _known_checksums[increment] = expected
    return expected == received


class FrameDecoder:
    """Turns a byte stream into the increments of its valid frames, in order.

    ``feed(chunk)`` returns the increments of every frame completed by the
    chunk, up to (not including) the first invalid one. After an invalid frame
    ``error`` is set and the decoder accepts no more input. ``close()`` is
    called when the peer ends the stream and reports leftover bytes.
    """

    __slots__ = ("_pending", "error")

    def __init__(self) -> None:
        self._pending = b""
        self.error: InvalidFrame | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held back, waiting for the rest."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> Sequence[int]:
        """Add ``chunk``; return the increments of the valid frames it completes."""
        if self.error is not None:
            raise RuntimeError("decoder stopped at an invalid frame; open a new one")
        data = self._pending + chunk if self._pending else chunk
        whole = len(data) - len(data) % FRAME_SIZE
        self._pending = data[whole:]
        if not whole:
            return ()
        count = whole // FRAME_SIZE
        first = data[:FRAME_SIZE]
        # count() finds non-overlapping matches; `count` of them in `whole`
        # bytes must tile it, so this is "every frame equals the first".
        if count == 1 or data.count(first, 0, whole) == count:
            increment, received = FRAME_STRUCT.unpack(first)
            if _is_valid(increment, received):
                return (increment,) * count
            return self._stop_at(increment, received, ())
        words = struct.unpack_from(f">{whole // 8}Q", data)
        increments = words[0::2]
        checksums = words[1::2]
        pairs = set(zip(increments, checksums, strict=True))
        if all(_is_valid(n, c) for n, c in pairs):
            return increments
        index, (n, c) = next(
            (i, pair)
            for i, pair in enumerate(zip(increments, checksums, strict=True))
            if not _is_valid(*pair)
        )
        return self._stop_at(n, c, increments[:index])

    def _stop_at(self, increment: int, received: int, valid: Sequence[int]) -> Sequence[int]:
        """Record the first invalid frame; the ``valid`` ones before it are returned."""
        self.error = checksum_mismatch(increment, received)
        self._pending = b""
        return valid

    def close(self) -> InvalidFrame | None:
        """End of stream: a TRUNCATED error if a partial frame was left over."""
        leftover, self._pending = len(self._pending), b""
        if leftover and self.error is None:
            return InvalidFrame(
                RejectReason.TRUNCATED,
                f"stream ended {leftover} bytes into a {FRAME_SIZE}-byte frame",
            )
        return None
