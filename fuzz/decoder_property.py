"""The property every fuzzer checks on the frame decoder, shared by the
coverage-guided target (fuzz_decoder.py) and the hypothesis run
(tests/protocol/test_decoder_fuzz.py).

The first byte of the input says how many cut points follow; the stream is fed
to a FrameDecoder in those chunks. It must never raise, and every increment it
yields must be exactly the frame at that position with a valid checksum.
"""

import itertools

from counter_server.protocol import FRAME_SIZE, FrameDecoder, RejectReason, encode_request


def check(data: bytes) -> None:
    """Raise AssertionError if the decoder mishandles ``data``."""
    if not data:
        return
    cuts, stream = data[0] % 8, data[1:]
    points = sorted({b % (len(stream) + 1) for b in stream[:cuts]})
    edges = [0, *points, len(stream)]
    decoder = FrameDecoder()
    decoded = []
    for start, end in itertools.pairwise(edges):
        decoded.extend(decoder.feed(stream[start:end]))
        if decoder.error is not None:
            assert decoder.error.reason is RejectReason.CHECKSUM
            break
    for index, increment in enumerate(decoded):
        assert stream[index * FRAME_SIZE : (index + 1) * FRAME_SIZE] == encode_request(increment)
    if decoder.error is None:
        assert len(decoded) == len(stream) // FRAME_SIZE
        truncated = decoder.close()
        assert (truncated is None) == (len(stream) % FRAME_SIZE == 0)
