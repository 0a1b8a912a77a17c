"""The counter protocol, version 1: bytes <-> values, with no I/O (sans-I/O).

Everything a server or client needs to speak the protocol (docs/protocol.md) lives here as pure
functions plus one small incremental decoder, so it can be tested exhaustively
without a network.
"""

from counter_server import one_name

one_name(__name__, "counter_server.protocol")  # before anything else

from counter_server.protocol.decoder import FrameDecoder
from counter_server.protocol.frames import (
    FRAME_SIZE,
    MAX_COUNTER,
    REPLY_SIZE,
    InvalidFrame,
    RejectReason,
    checksum,
    decode_replies,
    decode_reply,
    decode_request,
    encode_replies,
    encode_reply,
    encode_request,
    overflow,
)

__all__ = [
    "FRAME_SIZE",
    "MAX_COUNTER",
    "REPLY_SIZE",
    "FrameDecoder",
    "InvalidFrame",
    "RejectReason",
    "checksum",
    "decode_replies",
    "decode_reply",
    "decode_request",
    "encode_replies",
    "encode_reply",
    "encode_request",
    "overflow",
]
