"""Frame and reply codecs of the protocol (docs/protocol.md): pure functions on bytes and integers.

A request frame is 16 bytes: the increment ``n`` (unsigned 64-bit big-endian)
followed by the XXH64 (seed 0) of ``str(n)`` (big-endian). A reply is the
counter value after the frame was applied, unsigned 64-bit big-endian.
"""

from __future__ import annotations

import enum
import struct
import sys
from array import array
from collections.abc import Sequence

import xxhash

FRAME_SIZE = 16
REPLY_SIZE = 8
MAX_COUNTER = 2**64 - 1

FRAME_STRUCT = struct.Struct(">QQ")  # increment, checksum
_U64 = struct.Struct(">Q")
_xxh64 = xxhash.xxh64_intdigest
_LITTLE_ENDIAN = sys.byteorder == "little"
assert array("Q").itemsize == 8, "array('Q') must hold unsigned 64-bit integers"


class RejectReason(str, enum.Enum):
    """Why a connection's input was refused (used in logs and metrics)."""

    CHECKSUM = "checksum"
    TRUNCATED = "truncated"
    OVERFLOW = "overflow"


class InvalidFrame(ValueError):
    """A frame that must not be applied; ``reason`` says why."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def checksum(increment: int) -> int:
    """XXH64 (seed 0) of the ASCII decimal form of ``increment``."""
    return _xxh64(str(increment).encode("ascii"))


def encode_request(increment: int) -> bytes:
    """The 16-byte frame for ``increment`` (0 <= increment <= 2^64-1)."""
    if not 0 <= increment <= MAX_COUNTER:
        raise ValueError(f"increment {increment} is outside 0..2^64-1")
    return FRAME_STRUCT.pack(increment, checksum(increment))


def decode_request(frame: bytes) -> int:
    """The increment carried by one 16-byte frame; raises InvalidFrame if its
    checksum does not match or it is not exactly 16 bytes long."""
    if len(frame) != FRAME_SIZE:
        raise InvalidFrame(
            RejectReason.TRUNCATED, f"frame is {len(frame)} bytes, expected {FRAME_SIZE}"
        )
    increment, received = FRAME_STRUCT.unpack(frame)
    if checksum(increment) != received:
        raise checksum_mismatch(increment, received)
    return increment


def checksum_mismatch(increment: int, received: int) -> InvalidFrame:
    """The error for a frame carrying ``increment`` with the wrong checksum."""
    return InvalidFrame(
        RejectReason.CHECKSUM,
        f"checksum {received:016x} does not match increment {increment}",
    )


def overflow(increment: int, value: int) -> InvalidFrame:
    """The error for ``increment``, refused because it would take the counter
    (now ``value``) past ``MAX_COUNTER``."""
    return InvalidFrame(
        RejectReason.OVERFLOW,
        f"increment {increment} would take the counter ({value}) past {MAX_COUNTER}",
    )


def encode_reply(value: int) -> bytes:
    """The 8-byte reply carrying counter ``value``."""
    return _U64.pack(value)


def encode_replies(values: Sequence[int]) -> bytes:
    """All replies for ``values`` concatenated, in order, packed in one call."""
    if len(values) == 1:
        return _U64.pack(values[0])
    packed = array("Q", values)
    if _LITTLE_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def decode_reply(reply: bytes) -> int:
    """The counter value in one 8-byte reply; ValueError if not 8 bytes."""
    if len(reply) != REPLY_SIZE:
        raise ValueError(f"reply is {len(reply)} bytes, expected {REPLY_SIZE}")
    return _U64.unpack(reply)[0]


def decode_replies(data: bytes) -> tuple[int, ...]:
    """Counter values of consecutive replies; ``len(data)`` must be a multiple of 8."""
    if len(data) % REPLY_SIZE:
        raise ValueError(f"{len(data)} bytes is not a whole number of replies")
    return struct.unpack(f">{len(data) // REPLY_SIZE}Q", data)
